"""The hook engine: context managers over plain torch hooks on HF modules.

Every context removes its hooks and restores any weight it touched on exit, also when the
block raises, so the model is bit-identical afterwards (tests check the logits).

Positions: `positions=None` acts on every position of every forward pass (during cached
generation, on each new position); a list of ints indexes the sequence axis of each forward.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from dpolens.model.adapters import Adapter

TensorFn = Callable[[torch.Tensor], torch.Tensor | None]


@contextlib.contextmanager
def on_tensor(module: nn.Module, where: str, fn: TensorFn) -> Iterator[None]:
    """Call `fn` on a module's main input or output tensor; a returned tensor replaces it."""
    if where == "input":

        def pre_hook(mod, args, kwargs):
            if args:
                new = fn(args[0])
                if new is not None:
                    return (new, *args[1:]), kwargs
            else:
                new = fn(kwargs["hidden_states"])
                if new is not None:
                    return args, {**kwargs, "hidden_states": new}
            return None

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:

        def hook(mod, args, output):
            main = output[0] if isinstance(output, tuple) else output
            new = fn(main)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _select(x: torch.Tensor, positions: Sequence[int] | None) -> torch.Tensor:
    return x if positions is None else x[:, list(positions)]


@contextlib.contextmanager
def capture(
    adapter: Adapter,
    points: Iterable[tuple[int, str]],
    fn: Callable[[int, str, torch.Tensor], None] | None = None,
) -> Iterator[dict[tuple[int, str], list[torch.Tensor]]]:
    """Capture activations at (layer, point) pairs.

    With `fn`, each activation is handed to `fn(layer, point, tensor)` (for streaming
    accumulators) and nothing is stored; otherwise detached copies are appended per forward.
    """
    store: dict[tuple[int, str], list[torch.Tensor]] = defaultdict(list)
    with contextlib.ExitStack() as stack:
        for layer, name in points:
            module, where = adapter.point(layer, name)

            def grab(t, layer=layer, name=name):
                if fn is not None:
                    fn(layer, name, t)
                else:
                    store[(layer, name)].append(t.detach().clone())

            stack.enter_context(on_tensor(module, where, grab))
        yield store


@contextlib.contextmanager
def add_vector(
    adapter: Adapter,
    layer: int,
    point: str,
    vector: torch.Tensor,
    positions: Sequence[int] | None = None,
) -> Iterator[None]:
    """Add `vector` ([d_model]) to the residual at (layer, point); pass -α·u to subtract."""
    adapter.check_width(vector, "the added vector")
    module, where = adapter.point(layer, point)

    def add(x: torch.Tensor) -> torch.Tensor:
        v = vector.to(dtype=x.dtype, device=x.device)
        if positions is None:
            return x + v
        x = x.clone()
        x[:, list(positions)] += v
        return x

    with on_tensor(module, where, add):
        yield


@contextlib.contextmanager
def edit_neurons(
    adapter: Adapter,
    layer: int,
    neurons: Sequence[int] | torch.Tensor,
    *,
    scale: float | torch.Tensor | None = None,
    value: float | torch.Tensor | None = None,
    shift: float | torch.Tensor | None = None,
    positions: Sequence[int] | None = None,
    positive_only: bool = False,
) -> Iterator[None]:
    """Scale, set or shift (add to) the activations m_i of chosen neurons (per-neuron tensors allowed).

    `positive_only` (with `scale`): scale m_i only where m_i > 0 and leave it where m_i ≤ 0, so
    that only what a neuron writes along +v_i is amplified (on gated MLPs and GELU's negative lobe
    m_i < 0 writes −v_i)."""
    if sum(x is not None for x in (scale, value, shift)) != 1:
        raise ValueError("give exactly one of scale=, value= or shift=")
    if positive_only and scale is None:
        raise ValueError("positive_only applies to scale= only")
    idx = torch.as_tensor(neurons, dtype=torch.long)
    module, where = adapter.point(layer, "mlp_act")

    def edit(m: torch.Tensor) -> torch.Tensor:
        m = m.clone()
        i = idx.to(m.device)
        sel = m[..., i] if positions is None else m[:, list(positions)][..., i]
        if scale is not None:
            new = sel * torch.as_tensor(scale, dtype=m.dtype, device=m.device)
            if positive_only:
                new = torch.where(sel > 0, new, sel)
        elif shift is not None:
            new = sel + torch.as_tensor(shift, dtype=m.dtype, device=m.device)
        else:
            new = torch.as_tensor(value, dtype=m.dtype, device=m.device).expand_as(sel)
        if positions is None:
            m[..., i] = new
        else:
            pos = torch.as_tensor(list(positions), device=m.device)
            m[:, pos.unsqueeze(-1), i] = new
        return m

    with on_tensor(module, where, edit):
        yield


KEY_KINDS = ("gate", "key")  # what scale_keys scales: the gate_proj rows or the key (fc / up_proj) rows


@contextlib.contextmanager
def scale_keys(
    adapter: Adapter, layer: int, neurons: Sequence[int], factor: float, which: str = "key"
) -> Iterator[dict]:
    """Temporarily scale the key vectors (and key bias) of chosen neurons by `factor`.

    `which`: "key" (GELU: the fc rows; gated: up_proj rows, which scale m_i linearly) or "gate"
    (gated MLPs: the gate_proj rows; GELU MLPs fall back to their keys, the same thing there).
    Yields a record of what was scaled (module name, neurons, factor). Weights are restored
    from saved copies, never by dividing, so they come back bit-identical.
    """
    if which not in KEY_KINDS:
        raise ValueError(f"which must be 'key' or 'gate', not {which!r}")
    ks = (adapter.gate_slice(layer) if which == "gate" else None) or adapter.key_slice(layer)
    idx = torch.as_tensor(list(neurons), dtype=torch.long)
    targets = [(ks.weight, ks.dim)] + ([(ks.bias, 0)] if ks.bias is not None else [])
    saved = [(p, dim, p.detach().index_select(dim, idx).clone()) for p, dim in targets]
    try:
        with torch.no_grad():
            for p, dim, orig in saved:
                p.index_copy_(dim, idx, orig * factor)
        yield {"module": ks.module, "neurons": list(map(int, neurons)), "factor": factor}
    finally:
        with torch.no_grad():
            for p, dim, orig in saved:
                p.index_copy_(dim, idx, orig)


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once the needed activation is captured."""


@contextlib.contextmanager
def stop_at(adapter: Adapter, layer: int, point: str) -> Iterator[None]:
    """End the forward pass at (layer, point); enter it after the capture it serves.

    Callers catch StopForward. Hooks run in registration order, so a capture registered
    first still sees the tensor.
    """
    module, where = adapter.point(layer, point)

    def stop(_x):
        raise StopForward

    with on_tensor(module, where, stop):
        yield

"""Interventions as data: a spec (YAML/JSON) applied through the hook engine.

One spec is a list of edits; each edit is a mapping with `kind`:
  add / subtract   residual add or subtract `alpha * u` at (layer, point); `u` is unit-normalised
                   unless `normalize: false`. Defaults: the last layer's resid_post, every position.
  neurons          scale (`scale:`), set (`value:`) or shift (`shift:`) activations m_i; value and
                   shift are a number or one per neuron.
  scale_keys       multiply the key vectors of `neurons` by `factor` (weights restored on exit).
  scale_positive   multiply the activations m_i of `neurons` by `factor` where m_i > 0, leave them
                   where m_i ≤ 0: amplifies only what they write along +v_i (sign-aware un-aligning).
Vectors (`vector:`): a list of floats; `{file: x.safetensors, key: name, row: j}`;
`{value_vector: [layer, neuron]}` (the model's own MLP.v); `{random: seed}` (a unit control).
Negative layer numbers count from the end. Specs are recorded verbatim in results.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch

from dpolens.artifacts import DpolensError, read_safetensors, read_yaml
from dpolens.config import from_dict
from dpolens.model import hooks
from dpolens.model.loading import LoadedModel


@dataclass
class Intervention:
    kind: Literal["add", "subtract", "neurons", "scale_keys", "scale_positive"]
    layer: int = -1
    point: str = "resid_post"
    vector: Any = None
    alpha: float = 1.0
    normalize: bool = True
    neurons: list[int] = field(default_factory=list)
    scale: float | None = None
    value: Any = None
    shift: Any = None
    factor: float = 1.0
    positions: list[int] | None = None
    label: str = ""

    def describe(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, [], "")}


def parse_spec(spec: Any) -> list[Intervention]:
    """A spec from a file path, a YAML/JSON string, a mapping, or a list of mappings."""
    if spec is None or spec == "" or spec == []:
        return []
    if isinstance(spec, Intervention):
        return [spec]
    if isinstance(spec, (str, Path)):
        p = Path(spec)
        if p.suffix in (".yaml", ".yml", ".json"):
            spec = read_yaml(p, "intervention spec file")
        else:
            spec = read_yaml(str(spec), "intervention spec", is_text=True)
    if isinstance(spec, dict) and "interventions" in spec:
        spec = spec["interventions"]
    if isinstance(spec, dict):
        spec = [spec]
    if not isinstance(spec, list):
        raise DpolensError(f"an intervention spec is a list of mappings, got {type(spec).__name__}")
    out = []
    for item in spec:
        if isinstance(item, Intervention):
            out.append(item)
        else:
            out.append(from_dict(Intervention, item, prefix="intervention."))
    return out


def resolve_vector(lm: LoadedModel, vector: Any) -> torch.Tensor:
    """The [d_model] vector an edit names (see module docstring)."""
    a = lm.adapter
    if isinstance(vector, torch.Tensor):
        v = vector
    elif isinstance(vector, list):
        v = torch.tensor(vector, dtype=torch.float32)
    elif isinstance(vector, dict) and "file" in vector:
        p = Path(vector["file"])
        tensors, _ = read_safetensors(p, "vector file")
        key = vector.get("key") or next(iter(tensors))
        if key not in tensors:
            raise DpolensError(f"{p} has no tensor '{key}' (has: {', '.join(tensors)})")
        v = tensors[key]
        if v.ndim == 2:
            row = int(vector.get("row", 0))
            if not 0 <= row < len(v):
                raise DpolensError(f"{p}: tensor '{key}' has {len(v)} rows, no row {row}")
            v = v[row]
    elif isinstance(vector, dict) and "value_vector" in vector:
        layer, neuron = vector["value_vector"]
        a.check_neurons(layer, int(neuron), "value_vector neuron")
        v = a.value_vectors(a.layer_index(layer))[int(neuron)]
    elif isinstance(vector, dict) and "random" in vector:
        g = torch.Generator().manual_seed(int(vector["random"]))
        v = torch.randn(a.d_model, generator=g)
    else:
        raise DpolensError(f"cannot read vector spec {vector!r}")
    v = v.detach().float().reshape(-1)
    a.check_width(v, "the intervention vector")
    return v


@contextlib.contextmanager
def apply(lm: LoadedModel, spec: Any) -> Iterator[list[Intervention]]:
    """Apply every edit of `spec` for the duration of the block; all undone on exit."""
    edits = parse_spec(spec)
    a = lm.adapter
    with contextlib.ExitStack() as stack:
        for e in edits:
            layer = a.layer_index(e.layer, "intervention layer")
            if e.kind not in ("add", "subtract"):
                a.check_neurons(layer, e.neurons, "intervention neuron")
            if e.kind in ("add", "subtract"):
                v = resolve_vector(lm, e.vector)
                if e.normalize:
                    v = v / v.norm()
                sign = -1.0 if e.kind == "subtract" else 1.0
                stack.enter_context(hooks.add_vector(a, layer, e.point, sign * e.alpha * v, e.positions))
            elif e.kind == "neurons":
                as_t = lambda x: torch.as_tensor(x, dtype=torch.float32) if x is not None else None
                stack.enter_context(hooks.edit_neurons(a, layer, e.neurons, scale=e.scale, value=as_t(e.value),
                                                       shift=as_t(e.shift), positions=e.positions))
            elif e.kind == "scale_keys":
                stack.enter_context(hooks.scale_keys(a, layer, e.neurons, e.factor))
            elif e.kind == "scale_positive":
                stack.enter_context(hooks.edit_neurons(a, layer, e.neurons, scale=e.factor, positions=e.positions,
                                                       positive_only=True))
        yield edits


def describe(spec: Any) -> list[dict]:
    return [e.describe() for e in parse_spec(spec)]


def dumps(spec: Any) -> str:
    return json.dumps(describe(spec))

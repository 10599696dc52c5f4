"""Finished model computations kept in a run's shared folder, so that no stage or strength does them twice.

A dose-response repeats analyze, neurons and robustness on each kept DPO checkpoint; their base-model
work (greedy continuations, activation statistics, the logit-lens search) is the same at every strength.
With a cache folder (`dpolens run` gives these stages `runs/<name>/evals`, beside the evaluation cache),
a call of `generate`, `continuation_stats` or `prompt_stats` (or any JSON-valued computation) is stored
under the hash of everything that decides its result, and the next call with the same key reads it back:
the model's weight hash, dtype and device, the inputs (texts or token ids), and every setting, the batch
size included (it orders the fp32 sums). Not in the key: progress bars and labels, and `head_screen`
(exact: the tokens of plain fp32 greedy decoding, as in `evaluate.eval_key`). Without a folder every
call computes. Files, in the folder's `memo/`: `<kind>-<key>.json` (generations, values) and
`stats-<key>.safetensors` (statistics, `count` in its metadata), written atomically.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable

import torch

from dpolens.activations import Stats, continuation_stats
from dpolens.artifacts import atomic_path, fingerprint, read_json, read_safetensors, write_json
from dpolens.model.generation import Generation, generate
from dpolens.model.loading import LoadedModel

log = logging.getLogger(__name__)

VERSION = 1  # in every key: raise it when what a computation returns changes for the same inputs


def key(lm: LoadedModel, kind: str, parts: Any) -> str:
    """The hash of what decides a computation of `lm`: weights, dtype, device, `kind` and `parts`."""
    h = hashlib.sha256()
    fingerprint([VERSION, kind, lm.weight_hash, str(lm.model.dtype), str(lm.device), parts], h)
    return h.hexdigest()[:24]


def value(cache: str | Path | None, lm: LoadedModel, kind: str, parts: Any, compute: Callable[[], Any]) -> Any:
    """`compute()` (a JSON value), or what an earlier call with the same key stored in `cache`."""
    if cache is None:
        return compute()
    path = Path(cache) / "memo" / f"{kind}-{key(lm, kind, parts)}.json"
    if (hit := read_json(path)) is not None:
        log.info("%s of %s: read from %s", kind, lm.ref, path)
        return hit["value"]
    write_json(path, {"kind": kind, "model": lm.ref, "weight_sha256": lm.weight_hash, "value": compute()})
    return read_json(path)["value"]  # as a later call reads it (JSON types), not as computed


def generations(cache: str | Path | None, lm: LoadedModel, prompts: list[str], max_new_tokens: int = 20,
                **kw: Any) -> list[Generation]:
    """`model.generation.generate(lm, prompts, max_new_tokens, **kw)`, stored in `cache`. A call that counts
    the screen's fallbacks (`screen_stats`) always computes."""
    if cache is None or kw.get("screen_stats") is not None:
        return generate(lm, prompts, max_new_tokens, **kw)
    parts = [prompts, max_new_tokens, {k: v for k, v in kw.items() if k not in ("progress", "desc", "head_screen")}]
    rows = value(cache, lm, "generate", parts,
                 lambda: [asdict(g) for g in generate(lm, prompts, max_new_tokens, **kw)])
    return [Generation(**r) for r in rows]


def _flat(st: Stats) -> dict[str, torch.Tensor]:
    out = {}
    for f in fields(Stats):
        v = getattr(st, f.name)
        if isinstance(v, torch.Tensor):
            out[f.name] = v.contiguous()
        elif isinstance(v, dict):
            out.update({f"{f.name}.{layer}": t.contiguous() for layer, t in v.items()})
    return out


def _unflat(tensors: dict[str, torch.Tensor], count: int) -> Stats:
    nested: dict[str, dict[int, torch.Tensor]] = {"per_prompt_x": {}, "per_prompt_m": {}}
    plain = {}
    for name, t in tensors.items():
        if "." in name:
            field_, layer = name.split(".")
            nested[field_][int(layer)] = t
        else:
            plain[name] = t
    for d in nested.values():  # layers in ascending order, as continuation_stats builds them
        items = sorted(d.items())
        d.clear()
        d.update(items)
    return Stats(count=count, **plain, **nested)


def stats(cache: str | Path | None, lm: LoadedModel, seqs: list[tuple[list[int], list[int]]],
          fig_layers: list[int] | tuple = (), batch_size: int = 32, desc: str = "activations",
          progress: bool = True, **kw: Any) -> Stats:
    """`activations.continuation_stats(lm, seqs, fig_layers, batch_size, desc, progress, **kw)`, stored in `cache`."""
    if cache is None:
        return continuation_stats(lm, seqs, fig_layers, batch_size, desc, progress, **kw)
    kw_key = {k: (list(v) if isinstance(v, (range, tuple)) else v) for k, v in kw.items()}
    parts = [[list(p) for p in seqs], list(fig_layers), batch_size, kw_key]
    path = Path(cache) / "memo" / f"stats-{key(lm, 'stats', parts)}.safetensors"
    if path.is_file():
        tensors, meta = read_safetensors(path, "cached activation statistics")
        log.info("activation statistics (%s) of %s: read from %s", desc, lm.ref, path)
        return _unflat(tensors, int(meta["count"]))
    st = continuation_stats(lm, seqs, fig_layers, batch_size, desc, progress, **kw)
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(_flat(st), str(tmp), metadata={"count": str(st.count), "model": lm.ref,
                                                  "weight_sha256": lm.weight_hash})
    return st

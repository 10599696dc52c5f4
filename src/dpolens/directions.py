"""Directions in the residual stream that every stage may use: the probe's file, value vectors and
their ranking against the probe, their vocabulary projections and SVD, token writers, and the keys
of the top toxic neurons (paper 3.1-3.2, 5; method.md 1-2). The conventions (`space`,
`projection`) are explained in `dpolens.stages.vectors`, the stage that writes Table 1.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from dpolens.artifacts import DpolensError, atomic_path, read_json, read_safetensors
from dpolens.model import hooks
from dpolens.model.loading import LoadedModel

log = logging.getLogger(__name__)

def save_probe(path: str | Path, probe: torch.Tensor, bias: float, lm: LoadedModel, extra: dict,
               feature_std: torch.Tensor | None = None, neuron_sign: torch.Tensor | None = None) -> None:
    """The probe vector, the per-dimension std of its training features (for the standardised
    cosine of `dpolens vectors`), the sign of every neuron's mean activation on the probe's toxic
    training texts (`neuron_signs`: what fixes a gated neuron's direction in `toxic_scores`), and the
    model it belongs to."""
    from safetensors.torch import save_file

    meta = {"model_ref": lm.ref, "weight_sha256": lm.weight_hash, "model_type": lm.adapter.model_type,
            "d_model": str(lm.adapter.d_model), "n_layers": str(lm.adapter.n_layers),
            "bias": repr(bias), "feature": "final-norm residual, mean over real tokens",
            **{k: str(v) for k, v in extra.items()}}
    with atomic_path(path) as tmp:
        tensors = {"probe": probe.float().contiguous()}
        if feature_std is not None:
            tensors["feature_std"] = feature_std.float().contiguous()
        if neuron_sign is not None:
            tensors["neuron_sign"] = neuron_sign.float().contiguous()
        save_file(tensors, str(tmp), metadata=meta)


def load_probe(path: str | Path, lm: LoadedModel | None = None) -> tuple[torch.Tensor, dict]:
    """The probe vector [d_model] and its metadata; checked against `lm` when given."""
    p = Path(path)
    if p.is_dir():
        p = p / "probe.safetensors"
    tensors, meta = read_safetensors(p, "probe file")
    vec = tensors.get("probe")
    if vec is None:
        raise DpolensError(f"the probe file {p} has no 'probe' tensor (has: {', '.join(tensors) or 'none'})")
    if vec.ndim != 1 or not vec.numel():
        raise DpolensError(f"the probe in {p} must be one vector, got shape {tuple(vec.shape)}")
    if not torch.isfinite(vec).all() or not vec.abs().sum():
        raise DpolensError(f"the probe in {p} holds NaN, infinite or only zero values")
    for extra in ("feature_std", "neuron_sign"):
        if extra in tensors:
            meta[extra] = tensors[extra]
    if lm is not None:
        a = lm.adapter
        if vec.shape[-1] != a.d_model:
            raise DpolensError(f"the probe {p} has width {vec.shape[-1]} but the model "
                               f"{lm.ref} has d_model {a.d_model}")
        if meta.get("model_type") and meta["model_type"] != a.model_type:
            raise DpolensError(f"the probe {p} belongs to a {meta['model_type']} model "
                               f"({meta.get('model_ref')}), not to {lm.ref} ({a.model_type})")
        if meta.get("weight_sha256") and meta["weight_sha256"] != lm.weight_hash:
            log.info("probe %s was fitted on %s (weights %s); applying it to %s", p,
                     meta.get("model_ref"), meta["weight_sha256"][:12], lm.ref)
    return vec, meta


def all_value_vectors(lm: LoadedModel) -> torch.Tensor:
    """[n_layers, d_mlp, d_model] residual-space value vectors."""
    a = lm.adapter
    return torch.stack([a.value_vectors(l).float() for l in range(a.n_layers)])


def probe_in_residual(lm: LoadedModel, probe: torch.Tensor, space: str = "raw",
                      feature_std: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(map, direction): residual vectors v are compared as `v * map` with `direction`."""
    if space == "raw":
        return torch.ones_like(probe.float()), probe.float()
    if feature_std is None:
        raise DpolensError("space 'standardized' needs the probe's feature_std (refit the probe with this "
                           "version of dpolens) or use space: raw")
    sigma = feature_std.float().clamp(min=1e-12)
    return lm.adapter.final_norm_gain() / sigma, probe.float() * sigma


def rank_by_probe(lm: LoadedModel, probe: torch.Tensor, space: str = "raw",
                  feature_std: torch.Tensor | None = None) -> torch.Tensor:
    """[n_layers, d_mlp] cosine of every value vector with the probe, in `space`."""
    values = all_value_vectors(lm)  # [n_layers, d_mlp, d_model]
    return rank_cos(lm, values.flatten(0, 1), probe, space, feature_std).view(values.shape[:2])


def top_probe_neurons(lm: LoadedModel, probe: torch.Tensor, k: int, space: str = "raw",
                      meta: dict | None = None) -> list[tuple[int, int, float]]:
    """(layer, neuron, score) of the k neurons with the highest `toxic_scores`, best first."""
    return top_neurons(toxic_scores(lm, probe, meta or {}, space).flatten(), k, lm.adapter.d_mlp)


def neuron_signs(lm: LoadedModel, texts: list[str], max_tokens: int = 64, batch_size: int = 32,
                 progress: bool = False, agreement: bool = False):
    """[n_layers, d_mlp] sign (+1/-1) of each neuron's mean activation m over the tokens of `texts`
    (after the first). On a gated MLP the sign of m is a convention: flipping a neuron's up row and
    down column changes nothing in the model but the sign of m and of v. sign(m̄)·v, the direction
    the neuron writes on average on these texts, is a property of the model. With `agreement`, also
    the share of neurons whose sign is the same from either half of the texts (the same forward passes):
    how settled the sign is (`(sign, share)`)."""
    from dpolens.activations import continuation_stats

    ids = [x[:max_tokens] for x in lm.tokenizer(texts, add_special_tokens=True)["input_ids"]]
    seqs = [(x[:1], x[1:]) for x in ids if len(x) > 1]
    if not agreement:
        mean = continuation_stats(lm, seqs, (), batch_size, "neuron signs", progress).mean_m
        return torch.where(mean < 0, -1.0, 1.0)
    half = len(seqs) // 2
    a, b = (continuation_stats(lm, part, (), batch_size, "neuron signs", progress) for part in (seqs[:half], seqs[half:]))
    sign = torch.where(a.m_sum + b.m_sum < 0, -1.0, 1.0)
    return sign, float(((a.m_sum < 0) == (b.m_sum < 0)).float().mean())


def uses_signs(lm: LoadedModel) -> bool:
    """Whether a neuron's activation sign is a convention here (gate · up MLPs), so rankings use the
    probe's `neuron_sign`."""
    return lm.adapter.mlp_kind == "gated"


def toxic_scores(lm: LoadedModel, probe: torch.Tensor, meta: dict, space: str = "standardized") -> torch.Tensor:
    """[n_layers, d_mlp] THE ranking of toxic neurons, the one every stage uses (vectors, table2,
    analyze, unalign, neurons, alternatives, training's `toxic-neurons`): the cosine of each
    residual-space value vector (after post-MLP norms) with the probe in `space` (`standardized`: the
    direction the probe reads, γ ⊙ w, see `dpolens.stages.vectors`), times, on a gated MLP, the sign
    of the neuron's mean activation on the probe's toxic texts (`meta['neuron_sign']`), so that a
    reparametrisation flipping a neuron's up row and down column leaves the ranking unchanged. A
    gated model's probe without signs (fitted before they existed) ranks by the plain cosine, with a
    warning: refit the probe."""
    cos = rank_by_probe(lm, probe, space, meta.get("feature_std"))
    return cos * signs_of(lm, meta).to(cos)


def signs_of(lm: LoadedModel, meta: dict) -> torch.Tensor:
    """[n_layers, d_mlp] the signs `toxic_scores` applies: the probe's `neuron_sign` on a gated MLP, all +1
    elsewhere, and all +1 with a warning for a gated model's probe that has none (fitted before signs)."""
    sign = meta.get("neuron_sign")
    shape = (lm.adapter.n_layers, lm.adapter.d_mlp)
    if not uses_signs(lm):
        return torch.ones(shape)
    if isinstance(sign, torch.Tensor) and tuple(sign.shape) == shape:
        return sign.float()
    log.warning("the probe has no neuron signs for this gated model: toxic neurons are ranked by the plain "
                "cosine, which depends on the sign convention of each up row (refit the probe)")
    return torch.ones(shape)


def read_direction(lm: LoadedModel, probe: torch.Tensor, space: str = "standardized") -> torch.Tensor:
    """[d_model] unit residual direction whose dot product with a residual vector is what the probe
    reads of it: γ ⊙ w for a probe after the final norm (`standardized`), w itself (`raw`, the paper's)."""
    d = probe.float() * (lm.adapter.final_norm_gain() if space != "raw" else 1.0)
    return d / d.norm().clamp(min=1e-30)


def top_neurons(scores: torch.Tensor, k: int, d_mlp: int) -> list[tuple[int, int, float]]:
    """(layer, neuron, score) of the k highest of `scores` [n_layers * d_mlp], best first."""
    return [(i // d_mlp, i % d_mlp, float(scores[i])) for i in scores.topk(k).indices.tolist()]


@torch.inference_mode()
def vocab_projection(lm: LoadedModel, vectors: torch.Tensor, k: int = 10,
                     projection: str = "raw") -> list[dict]:
    """Top and bottom k tokens of each vector's projection onto the vocabulary."""
    a, tok = lm.adapter, lm.tokenizer
    x = vectors.to(a.unembed.dtype)
    logits = a.logits(x, apply_norm=(projection == "norm")).float()
    top = logits.topk(k, dim=-1).indices.tolist()
    bottom = (-logits).topk(k, dim=-1).indices.tolist()
    dec = lambda ids: [tok.decode([i]) for i in ids]
    return [{"top_tokens": dec(t), "bottom_tokens": dec(b)} for t, b in zip(top, bottom)]


def toxic_svd(unit_vectors: torch.Tensor, probe_grad: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right singular vectors U[0..k) (rows) and singular values; signs make U·probe_grad >= 0,
    where probe_grad is the residual direction that raises the probe's logit."""
    _, s, vh = torch.linalg.svd(unit_vectors.double(), full_matrices=False)
    u = vh[:k].float()
    signs = torch.sign(u @ probe_grad.float())
    signs[signs == 0] = 1
    return u * signs[:, None], s[:k].float()


def rank_cos(lm: LoadedModel, vectors: torch.Tensor, probe: torch.Tensor, space: str,
             feature_std: torch.Tensor | None) -> torch.Tensor:
    """Cosine of residual-space `vectors` [n, d] with the probe, in `space`."""
    scale, direction = probe_in_residual(lm, probe, space, feature_std)
    v = vectors.float() * scale
    return (v @ direction) / (v.norm(dim=-1).clamp(min=1e-30) * direction.norm())


@torch.inference_mode()
def token_writer_scores(lm: LoadedModel, values: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """[n] mean z-score of `token_ids` in the logit lens E·(γ ⊙ v) of each residual vector v [n, d]."""
    a = lm.adapter
    unembed = a.unembed.float()
    centred = unembed - unembed.mean(0)                          # [vocab, d]: softmax ignores shifts
    gram = centred.T @ centred / unembed.shape[0]                # [d, d]: logit variance = uᵀ G u
    u = values.float() * a.final_norm_gain()                     # [n, d] as the readout sees them
    logit_sd = ((u @ gram) * u).sum(-1).clamp(min=1e-30).sqrt()  # [n]
    return (u @ centred[token_ids].T).mean(-1) / logit_sd


def probe_top_tokens(lm: LoadedModel, probe: torch.Tensor, k_tokens: int) -> list[int]:
    """Ids of the k_tokens tokens the probe direction promotes most (it lives after the final norm)."""
    return (lm.adapter.unembed.float() @ probe.float()).topk(k_tokens).indices.tolist()


def signed_values(lm: LoadedModel, meta: dict | None = None) -> torch.Tensor:
    """[n_layers, d_mlp, d_model] sign·v: on a gated MLP the direction each neuron writes when it fires
    on the probe's toxic texts (`toxic_scores`); the value vectors themselves elsewhere."""
    return all_value_vectors(lm) * signs_of(lm, meta or {})[..., None]


def token_writer_ranking(lm: LoadedModel, probe: torch.Tensor, k_tokens: int, meta: dict | None = None,
                         values: torch.Tensor | None = None, token_ids: list[int] | None = None) -> torch.Tensor:
    """[n_layers * d_mlp] every signed value vector's token-writer score for the probe's top k_tokens tokens: the
    one ranking `top_token_writers`, `token_writers` and the neurons stage share. `values` ([n_layers * d_mlp,
    d_model] signed value vectors) and `token_ids` (the probe's top tokens): where the caller has them already."""
    values = signed_values(lm, meta).flatten(0, 1) if values is None else values
    token_ids = probe_top_tokens(lm, probe, k_tokens) if token_ids is None else token_ids
    return token_writer_scores(lm, values, token_ids)


def top_token_writers(lm: LoadedModel, probe: torch.Tensor, k: int, k_tokens: int,
                      meta: dict | None = None) -> list[tuple[int, int, float]]:
    """(layer, neuron, score) of the k value vectors that most promote the probe's top k_tokens tokens."""
    return top_neurons(token_writer_ranking(lm, probe, k_tokens, meta), k, lm.adapter.d_mlp)


def token_writers(lm: LoadedModel, probe: torch.Tensor, cos: torch.Tensor, k_tokens: int, n: int,
                  projection: str, meta: dict | None = None) -> dict:
    """The n value vectors that most promote the probe's top k_tokens tokens, with their cosine rank."""
    d_mlp = lm.adapter.d_mlp
    values = signed_values(lm, meta).flatten(0, 1)  # [n_layers * d_mlp, d_model]
    token_ids = probe_top_tokens(lm, probe, k_tokens)
    best = top_neurons(token_writer_ranking(lm, probe, k_tokens, meta, values, token_ids), n, d_mlp)
    cos = cos.flatten()
    rank = torch.empty_like(cos, dtype=torch.long)
    rank[cos.argsort(descending=True)] = torch.arange(cos.numel())
    flat = [layer * d_mlp + neuron for layer, neuron, _ in best]
    proj = vocab_projection(lm, values[flat], 10, projection)
    sign = signs_of(lm, meta or {}).flatten()
    rows = [{"layer": layer, "neuron": neuron, "score": score, "cosine": float(cos[i]), "cosine_rank": int(rank[i]),
             "sign": int(sign[i]), **proj[r]} for r, ((layer, neuron, score), i) in enumerate(zip(best, flat))]
    return {"probe_tokens": [lm.tokenizer.decode([t]) for t in token_ids], "rows": rows,
            "median_cosine_rank": float(torch.tensor([r["cosine_rank"] for r in rows]).float().median()),
            "score": "mean z-score of the probe's top tokens among all logits of E·(γ ⊙ v)"}


def random_vector_tokens(lm: LoadedModel, values: torch.Tensor, n: int, seed: int, k_tokens: int,
                         projection: str, chunk: int = 64) -> dict:
    """Top tokens of n of the value vectors `values` [n_layers, d_mlp, d_model], drawn uniformly
    (seeded) over every layer: the baseline against which the toxicity of the top cosine vectors'
    tokens is judged. The vocabulary projection runs `chunk` vectors at a time (vocab-sized logits)."""
    d_mlp = values.shape[1]
    flat_values = values.flatten(0, 1)
    flat = torch.randperm(flat_values.shape[0], generator=torch.Generator().manual_seed(seed))[:n].tolist()
    proj = []
    for start in range(0, len(flat), chunk):
        proj += vocab_projection(lm, flat_values[flat[start : start + chunk]], k_tokens, projection)
    rows = [{"layer": i // d_mlp, "neuron": i % d_mlp, "top_tokens": p["top_tokens"]} for i, p in zip(flat, proj)]
    return {"n": len(rows), "seed": seed, "projection": projection, "model": lm.identity(), "rows": rows}


def load_vectors(folder: str | Path) -> list[dict]:
    p = Path(folder) / "toxic_vectors.json"
    if not p.exists():
        raise DpolensError(f"no toxic_vectors.json in {folder}: run `dpolens vectors` first")
    rows = read_json(p)
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and {"layer", "neuron", "cosine"} <= set(r)
                                                         for r in rows):
        raise DpolensError(f"{p} lists no vectors (a list of {{layer, neuron, cosine, ...}} rows)")
    return rows


def toxic_keys(lm: LoadedModel, probe_path: str, k: int, space: str, rank: str = "cosine",
               writer_tokens: int = 10) -> list[tuple[int, int, float]]:
    """(layer, neuron, score) of the k value vectors of `lm` (ranked in `lm` itself) most
    cosine-similar to the probe, or (`rank: token-writers`) most promoting its top tokens."""
    probe, meta = load_probe(probe_path, lm)
    if rank == "cosine":
        return top_probe_neurons(lm, probe, k, space, meta)
    return top_token_writers(lm, probe, k, writer_tokens, meta)


@contextlib.contextmanager
def keys_scaled(lm: LoadedModel, targets: list[tuple[int, int, float]], scale: float, which: str = "gate"):
    """Scale the keys of `targets` by `scale` for the duration; yields what was scaled. Inside,
    `lm.weight_hash` is the scaled weights' (LoadedModel.weights_edited)."""
    with lm.weights_edited(), contextlib.ExitStack() as stack:
        yield [stack.enter_context(hooks.scale_keys(lm.adapter, layer, [neuron], scale, which))
               for layer, neuron, _ in targets]

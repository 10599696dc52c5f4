"""Toxic value vectors, their vocabulary projections, and their SVD (paper 3.1-3.2, Table 1).

Every value vector v_i^l of every layer (residual-space, with Gemma's post-norm gain) is ranked
by its cosine with the probe w; MLP.v_Toxic = the top N. Where the cosine is taken (`space`):
  raw           cos(v, w), the paper's (GPT-2): w lives after the final norm, v before it.
  standardized  (default) cos(v ⊙ γ / σ, w ⊙ σ): v as the probe's features see it (through the
                final norm's gain γ), in units of the features' per-dimension std σ. Deviation from
                the paper, needed on Gemma: its residual has dimensions with final gains up to 301
                whose raw cosines rank multilingual noise first (measured: 0 of the top 10 toxic
                in `raw` on gemma-3-270m).
The vocabulary projection of a residual-space vector u is the top tokens of the logit lens of u
through the final norm (`projection: norm`, default) or of E·u (`raw`, the paper's); the probe,
which lives after the final norm, is always projected raw. SVD.U_Toxic[j] = the j-th right
singular vector of the N unit-normalised toxic vectors (residual space), sign-fixed so that U[j]
raises the probe's logit.

Token writers (a diagnostic beside the ranking, not part of the paper): the value vectors whose
logit lens most promotes the probe's own top tokens (the ones Table 1 lists for W_Toxic), scored
by the mean z-score of those tokens among all vocabulary logits, with their rank by cosine. It
shows whether the model's profanity writers are the ones the probe's cosine finds.

Random vectors (`random_vectors.json`): the top tokens of `n_random` value vectors drawn at
random (seeded), the baseline for how toxic Table 1's top tokens are (see dpolens.claims).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from dpolens.artifacts import DpolensError, atomic_path, write_json, write_manifest, write_text
from dpolens.model.loading import LoadedModel, load_model
from dpolens.probe import load_probe


@dataclass
class VectorsConfig:
    model: str = "gemma-3-270m"
    probe: str = "runs/probe"
    out: str = "runs/vectors"
    top_n: int = 128
    n_tokens: int = 10
    svd_k: int = 3
    n_writers: int = 20
    n_random: int = 200  # random value vectors whose top tokens are the baseline for Table 1's
    random_seed: int = 0
    space: Literal["raw", "standardized"] = "standardized"
    projection: Literal["raw", "norm"] = "norm"
    dtype: str = "float32"


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
                      feature_std: torch.Tensor | None = None) -> list[tuple[int, int, float]]:
    """(layer, neuron, cosine) of the k value vectors most cosine-similar to the probe, best first."""
    return top_neurons(rank_by_probe(lm, probe, space, feature_std).flatten(), k, lm.adapter.d_mlp)


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


def top_token_writers(lm: LoadedModel, probe: torch.Tensor, k: int, k_tokens: int) -> list[tuple[int, int, float]]:
    """(layer, neuron, score) of the k value vectors that most promote the probe's top k_tokens tokens."""
    scores = token_writer_scores(lm, all_value_vectors(lm).flatten(0, 1), probe_top_tokens(lm, probe, k_tokens))
    return top_neurons(scores, k, lm.adapter.d_mlp)


def token_writers(lm: LoadedModel, probe: torch.Tensor, cos: torch.Tensor, k_tokens: int, n: int,
                  projection: str) -> dict:
    """The n value vectors that most promote the probe's top k_tokens tokens, with their cosine rank."""
    d_mlp = lm.adapter.d_mlp
    values = all_value_vectors(lm).flatten(0, 1)  # [n_layers * d_mlp, d_model]
    token_ids = probe_top_tokens(lm, probe, k_tokens)
    best = top_neurons(token_writer_scores(lm, values, token_ids), n, d_mlp)
    cos = cos.flatten()
    rank = torch.empty_like(cos, dtype=torch.long)
    rank[cos.argsort(descending=True)] = torch.arange(cos.numel())
    flat = [layer * d_mlp + neuron for layer, neuron, _ in best]
    proj = vocab_projection(lm, values[flat], 10, projection)
    rows = [{"layer": layer, "neuron": neuron, "score": score, "cosine": float(cos[i]), "cosine_rank": int(rank[i]),
             **proj[r]} for r, ((layer, neuron, score), i) in enumerate(zip(best, flat))]
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
    rows = json.loads(p.read_text())
    if not rows:
        raise DpolensError(f"{p} lists no vectors")
    return rows


def run_vectors(cfg: VectorsConfig) -> dict:
    lm = load_model(cfg.model, dtype=cfg.dtype)
    probe, meta = load_probe(cfg.probe, lm)
    a = lm.adapter
    cos = rank_by_probe(lm, probe, cfg.space, meta.get("feature_std"))
    probe_grad = probe.float() * (a.final_norm_gain() if cfg.space != "raw" else 1.0)
    n = min(cfg.top_n, cos.numel())
    layers, neurons, _ = zip(*top_neurons(cos.flatten(), n, a.d_mlp))
    layers, neurons = list(layers), list(neurons)
    values = all_value_vectors(lm)
    top_vecs = values[layers, neurons]
    proj = vocab_projection(lm, top_vecs, cfg.n_tokens, cfg.projection)
    rows = [{"rank": r, "layer": l, "neuron": i, "cosine": float(cos[l, i]), "norm": float(top_vecs[r].norm()),
             **proj[r]} for r, (l, i) in enumerate(zip(layers, neurons))]
    unit = top_vecs / top_vecs.norm(dim=-1, keepdim=True)
    u, s = toxic_svd(unit, probe_grad, cfg.svd_k)
    u_proj = vocab_projection(lm, u, cfg.n_tokens, cfg.projection)
    probe_proj = vocab_projection(lm, probe[None], cfg.n_tokens, "raw")[0]

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "toxic_vectors.json", rows)
    from safetensors.torch import save_file

    with atomic_path(out / "svd.safetensors") as tmp:
        save_file({"U": u.contiguous(), "S": s.contiguous(), "toxic_vectors": top_vecs.contiguous()},
                  str(tmp), metadata={"model_ref": lm.ref, "weight_sha256": lm.weight_hash,
                                      "model_type": a.model_type, "top_n": str(n),
                                      "space": cfg.space, "sign": "U[j] raises the probe logit"})
    svd_cos = rank_cos(lm, u, probe, cfg.space, meta.get("feature_std"))
    svd_rows = [{"j": j, "singular_value": float(s[j]), "cosine_with_probe": float(svd_cos[j]), **u_proj[j]}
                for j in range(len(u))]
    write_json(out / "svd.json", svd_rows)
    writers = token_writers(lm, probe, cos, cfg.n_tokens, cfg.n_writers, cfg.projection)
    write_json(out / "token_writers.json", writers)
    write_json(out / "random_vectors.json", random_vector_tokens(lm, values, cfg.n_random, cfg.random_seed,
                                                                 cfg.n_tokens, cfg.projection))
    write_text(out / "table1.md", table1(lm, probe_proj, rows, svd_rows, cfg, writers))
    summary = {"model": lm.identity(), "probe": meta.get("model_ref"), "top_n": n,
               "space": cfg.space, "projection": cfg.projection, "top10": rows[:10], "svd": svd_rows,
               "probe_tokens": probe_proj, "cosine_histogram": torch.histc(cos.flatten(), 20, -1, 1).tolist(),
               "token_writers_median_cosine_rank": writers["median_cosine_rank"]}
    write_json(out / "summary.json", summary)
    write_manifest(out, "vectors", cfg, model=lm.identity())
    return summary


def table1(lm, probe_proj, rows, svd_rows, cfg, writers) -> str:
    """The paper's Table 1: probe, the top MLP.v, SVD.U[0..k) with their top tokens."""
    fmt = lambda toks: ", ".join(repr(t)[1:-1].strip() or repr(t) for t in toks)
    how = "E·u" if cfg.projection == "raw" else "E·finalnorm(u)"
    lines = [f"# Table 1 — toxic vectors of {lm.ref}", "",
             f"Cosine space: {cfg.space}; vocabulary projection of value and SVD vectors: {how}; "
             "the probe (which lives after the final norm): E·w.", "",
             "| vector | cosine with probe | top tokens |", "|---|---|---|",
             f"| W_Toxic (probe) | 1.000 | {fmt(probe_proj['top_tokens'])} |"]
    for r in rows[:5]:
        lines.append(f"| MLP.v L{r['layer']} n{r['neuron']} | {r['cosine']:.3f} | {fmt(r['top_tokens'])} |")
    for r in svd_rows:
        lines.append(f"| SVD.U_Toxic[{r['j']}] | {r['cosine_with_probe']:.3f} | {fmt(r['top_tokens'])} |")
    lines += ["", "## Token writers (diagnostic)", "",
              f"Value vectors that most promote the probe's top tokens ({fmt(writers['probe_tokens'])}); "
              f"median rank by cosine of the top {len(writers['rows'])}: {writers['median_cosine_rank']:.0f} "
              f"(of {lm.adapter.n_layers * lm.adapter.d_mlp}).", "",
              "| vector | z-score | cosine (rank) | top tokens |", "|---|---|---|---|"]
    for r in writers["rows"][:5]:
        lines.append(f"| MLP.v L{r['layer']} n{r['neuron']} | {r['score']:.2f} | {r['cosine']:.3f} "
                     f"({r['cosine_rank']}) | {fmt(r['top_tokens'])} |")
    return "\n".join(lines) + "\n"

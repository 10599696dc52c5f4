"""Toxic value vectors, their vocabulary projections, and their SVD (paper 3.1-3.2, Table 1).

Every value vector v_i^l of every layer (residual-space, with Gemma's post-norm gain) is ranked
by cos(v_i^l, w) with the probe w; MLP.v_Toxic = the top N. The vocabulary projection of a
vector u is the top tokens of E·u (`projection: raw`, the paper's) or of the logit lens of u
through the final norm (`projection: norm`). SVD.U_Toxic[j] = the j-th right singular vector
of the N unit-normalised toxic vectors, sign-fixed so that cos(U[j], w) >= 0.
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
    projection: Literal["raw", "norm"] = "raw"
    dtype: str = "float32"


def all_value_vectors(lm: LoadedModel) -> torch.Tensor:
    """[n_layers, d_mlp, d_model] residual-space value vectors."""
    a = lm.adapter
    return torch.stack([a.value_vectors(l).float() for l in range(a.n_layers)])


def rank_by_probe(lm: LoadedModel, probe: torch.Tensor) -> torch.Tensor:
    """[n_layers, d_mlp] cosine of every value vector with the probe."""
    values = all_value_vectors(lm)
    w = probe.float() / probe.float().norm()
    return (values @ w) / values.norm(dim=-1).clamp(min=1e-12)


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


def toxic_svd(unit_vectors: torch.Tensor, probe: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right singular vectors U[0..k) (rows) and singular values, signs aligned with the probe."""
    _, s, vh = torch.linalg.svd(unit_vectors.double(), full_matrices=False)
    u = vh[:k].float()
    signs = torch.sign(u @ probe.float())
    signs[signs == 0] = 1
    return u * signs[:, None], s[:k].float()


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
    cos = rank_by_probe(lm, probe)
    flat = cos.flatten()
    n = min(cfg.top_n, flat.numel())
    best = flat.topk(n).indices
    layers, neurons = (best // a.d_mlp).tolist(), (best % a.d_mlp).tolist()
    values = all_value_vectors(lm)
    top_vecs = values[layers, neurons]
    proj = vocab_projection(lm, top_vecs, cfg.n_tokens, cfg.projection)
    rows = [{"rank": r, "layer": l, "neuron": i, "cosine": float(cos[l, i]), "norm": float(top_vecs[r].norm()),
             **proj[r]} for r, (l, i) in enumerate(zip(layers, neurons))]
    unit = top_vecs / top_vecs.norm(dim=-1, keepdim=True)
    u, s = toxic_svd(unit, probe, cfg.svd_k)
    u_proj = vocab_projection(lm, u, cfg.n_tokens, cfg.projection)
    probe_proj = vocab_projection(lm, probe[None], cfg.n_tokens, cfg.projection)[0]

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "toxic_vectors.json", rows)
    from safetensors.torch import save_file

    with atomic_path(out / "svd.safetensors") as tmp:
        save_file({"U": u.contiguous(), "S": s.contiguous(), "toxic_vectors": top_vecs.contiguous()},
                  str(tmp), metadata={"model_ref": lm.ref, "weight_sha256": lm.weight_hash,
                                      "model_type": a.model_type, "top_n": str(n),
                                      "sign": "cos(U[j], probe) >= 0"})
    svd_rows = [{"j": j, "singular_value": float(s[j]), "cosine_with_probe": float(
        u[j] @ probe / probe.norm()), **u_proj[j]} for j in range(len(u))]
    write_json(out / "svd.json", svd_rows)
    write_text(out / "table1.md", table1(lm, probe_proj, rows, svd_rows, cfg))
    summary = {"model": lm.identity(), "probe": meta.get("model_ref"), "top_n": n,
               "projection": cfg.projection, "top10": rows[:10], "svd": svd_rows,
               "probe_tokens": probe_proj, "cosine_histogram": torch.histc(flat, 20, -1, 1).tolist()}
    write_json(out / "summary.json", summary)
    write_manifest(out, "vectors", cfg, model=lm.identity())
    return summary


def table1(lm, probe_proj, rows, svd_rows, cfg) -> str:
    """The paper's Table 1: probe, the top MLP.v, SVD.U[0..k) with their top tokens."""
    fmt = lambda toks: ", ".join(repr(t)[1:-1].strip() or repr(t) for t in toks)
    lines = [f"# Table 1 — toxic vectors of {lm.ref} (projection: {cfg.projection}, E·u)", "",
             "| vector | cosine with probe | top tokens |", "|---|---|---|",
             f"| W_Toxic (probe) | 1.000 | {fmt(probe_proj['top_tokens'])} |"]
    for r in rows[:5]:
        lines.append(f"| MLP.v L{r['layer']} n{r['neuron']} | {r['cosine']:.3f} | {fmt(r['top_tokens'])} |")
    for r in svd_rows:
        lines.append(f"| SVD.U_Toxic[{r['j']}] | {r['cosine_with_probe']:.3f} | {fmt(r['top_tokens'])} |")
    return "\n".join(lines) + "\n"

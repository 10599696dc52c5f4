"""Toxic value vectors, their vocabulary projections, and their SVD (paper 3.1-3.2, Table 1).

Every value vector v_i^l of every layer (residual-space, with Gemma's post-norm gain) is ranked
by its cosine with the probe w; MLP.v_Toxic = the top N. Where the cosine is taken (`space`):
  raw           cos(v, w), the paper's (GPT-2): w lives after the final norm, v before it.
  standardized  (default) cos(v ⊙ γ / σ, w ⊙ σ): v as the probe's features see it (through the
                final norm's gain γ), in units of the features' per-dimension std σ. Deviation from
                the paper, needed on Gemma: its residual has dimensions with final gains up to 301
                whose raw cosines rank multilingual noise first (measured: 0 of the top 10 toxic
                in `raw` on gemma-3-270m).
On a gated MLP (Gemma, Llama) the sign of a neuron's activation is a convention: flipping its up row and
down column changes nothing in the model but the signs of m and v. There v is replaced by sign·v, the
direction the neuron writes when it fires on the probe's toxic training texts (sign of its mean
activation there, saved with the probe), before ranking, projecting and SVD; the `sign` column says
which. `directions.toxic_scores` is this ranking, and every stage that names toxic neurons uses it.
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
random (seeded), the baseline for how toxic Table 1's top tokens are (the claim `vectors_toxic_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np
import torch

from dpolens.artifacts import DpolensError, atomic_path, read_json, write_json, write_manifest, write_text
from dpolens.config import RunSettings, at_least
from dpolens.directions import (
    load_probe,
    random_vector_tokens,
    rank_cos,
    read_direction,
    signed_values,
    signs_of,
    token_writers,
    top_neurons,
    toxic_scores,
    toxic_svd,
    vocab_projection,
)
from dpolens.evaluate import unpaired_bootstrap
from dpolens.ledger import Claim, Measured, StageContext, identity, interval, num
from dpolens.model.loading import load_model
from dpolens.webpage import table


@dataclass
class VectorsConfig(RunSettings):
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

    def __post_init__(self):
        super().__post_init__()
        at_least(self, 1, "top_n")


class TokenProjection(TypedDict):
    """A vector's vocabulary projection (`projection`; the probe's is always raw)."""

    top_tokens: list[str]  # the n_tokens most promoted tokens, decoded
    bottom_tokens: list[str]  # the n_tokens most suppressed


class TopVector(TypedDict):
    """A value vector ranked by cosine with the probe, as results.json shows it."""

    layer: int
    neuron: int
    cosine: float  # with the probe, in `space`, of sign·v (directions.toxic_scores)
    top_tokens: list[str]


class ToxicVector(TopVector):
    """A row of toxic_vectors.json."""

    rank: int  # 0 = most similar to the probe
    sign: int  # gated MLPs: the sign of the neuron's mean activation on the probe's toxic texts (else 1)
    norm: float  # ‖v‖ in residual space
    bottom_tokens: list[str]


class SVDRow(TokenProjection):
    j: int  # SVD.U_Toxic[j]
    singular_value: float
    cosine_with_probe: float  # in `space`; U[j] is sign-fixed to raise the probe's logit


class VectorsSummary(TypedDict):
    """What `run_vectors` returns and writes to summary.json."""

    model: dict[str, Any]  # LoadedModel.identity()
    probe: str | None  # the probe file's model_ref
    top_n: int  # vectors in MLP.v_Toxic
    space: str
    projection: str
    top10: list[ToxicVector]
    svd: list[SVDRow]
    probe_tokens: TokenProjection
    cosine_histogram: list[float]  # counts of all value vectors' cosines in 20 bins over [-1, 1]
    token_writers_median_cosine_rank: float


class VectorsHeadline(TypedDict, total=False):  # empty without toxic_vectors.json
    toxic_vectors: list[TopVector]  # the top 10


def run_vectors(cfg: VectorsConfig) -> VectorsSummary:
    lm = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    probe, meta = load_probe(cfg.probe, lm)
    a = lm.adapter
    cos = toxic_scores(lm, probe, meta, cfg.space)  # on a gated MLP: cosine · the neuron's sign
    sign = signs_of(lm, meta)
    probe_grad = read_direction(lm, probe, cfg.space)
    n = min(cfg.top_n, cos.numel())
    layers, neurons, _ = zip(*top_neurons(cos.flatten(), n, a.d_mlp))
    layers, neurons = list(layers), list(neurons)
    values = signed_values(lm, meta)  # sign·v: the direction each neuron writes when it fires
    top_vecs = values[layers, neurons]
    proj = vocab_projection(lm, top_vecs, cfg.n_tokens, cfg.projection)
    rows = [{"rank": r, "layer": l, "neuron": i, "cosine": float(cos[l, i]), "sign": int(sign[l, i]),
             "norm": float(top_vecs[r].norm()), **proj[r]} for r, (l, i) in enumerate(zip(layers, neurons))]
    unit = top_vecs / top_vecs.norm(dim=-1, keepdim=True)
    u, s = toxic_svd(unit, probe_grad, cfg.svd_k)
    u_proj = vocab_projection(lm, u, cfg.n_tokens, cfg.projection)
    probe_proj = vocab_projection(lm, probe[None], cfg.n_tokens, "raw")[0]

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "toxic_vectors.json", rows)
    from safetensors.torch import save_file

    with atomic_path(out / "svd.safetensors") as tmp:
        save_file({"U": u.contiguous(), "S": s.contiguous(), "toxic_vectors": top_vecs.contiguous()},  # sign·v
                  str(tmp), metadata={"model_ref": lm.ref, "weight_sha256": lm.weight_hash,
                                      "model_type": a.model_type, "top_n": str(n),
                                      "space": cfg.space, "sign": "U[j] raises the probe logit"})
    svd_cos = rank_cos(lm, u, probe, cfg.space, meta.get("feature_std"))
    svd_rows = [{"j": j, "singular_value": float(s[j]), "cosine_with_probe": float(svd_cos[j]), **u_proj[j]}
                for j in range(len(u))]
    write_json(out / "svd.json", svd_rows)
    writers = token_writers(lm, probe, cos, cfg.n_tokens, cfg.n_writers, cfg.projection, meta)
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


def headline(folder: Path) -> VectorsHeadline:
    """The 10 value vectors most similar to the probe, for results.json."""
    if not (v := read_json(folder / "toxic_vectors.json")):
        return {}
    return {"toxic_vectors": [{k: x[k] for k in ("layer", "neuron", "cosine", "top_tokens")} for x in v[:10]]}


def section(folder: Path, headline: VectorsHeadline, manifest: dict) -> str:
    parts = []
    if (t1 := read_json(folder / "toxic_vectors.json")):
        rows = [{**r, "top_tokens": ", ".join(r["top_tokens"][:8])} for r in t1[:10]]
        parts += ["<h2>Toxic value vectors (Table 1)</h2>",
                  table(rows, ["layer", "neuron", "cosine", "top_tokens"],
                        f"The 10 value vectors most similar to the probe and their top tokens. Paper: {PAPER}.")]
    if (tw := read_json(folder / "token_writers.json")):
        rows = [{**r, "top_tokens": ", ".join(r["top_tokens"][:8])} for r in tw["rows"][:5]]
        parts.append(table(rows, ["layer", "neuron", "score", "cosine", "cosine_rank", "top_tokens"],
                           "Diagnostic: the value vectors that most promote the probe's own top tokens "
                           f"({', '.join(t.strip() for t in tw['probe_tokens'])}), and where the cosine "
                           f"ranks them (median rank of the top {len(tw['rows'])}: {tw['median_cosine_rank']:.0f})."))
    return "".join(parts)


PAPER = "Table 1: MLP.v^19_770 → sh*t, a**, cr*p, f*ck, c*nt, garbage, trash (and 6 more toxic vectors)"
TOP_VECTORS = 10  # Table 1 lists the top 10 value vectors


def vectors_toxic_tokens(ctx: StageContext) -> Measured:
    top = ctx.json("toxic_vectors.json")[:TOP_VECTORS]
    summary = ctx.json("summary.json", required=False) or {}
    writers = ctx.json("token_writers.json", required=False)
    random = ctx.json("random_vectors.json", required=False)
    writer_text = ""
    if writers:
        ranks = [r["cosine_rank"] for r in writers["rows"][:TOP_VECTORS]]
        writer_text = (f"; the vectors that most promote the probe's own top tokens rank {ranks} by cosine "
                       f"(median of the top {len(writers['rows'])}: {writers['median_cosine_rank']:.0f})")
    models = {"model": identity(summary.get("model"))}
    if not random:
        return Measured(None, None, len(top), "no random-vector baseline (vectors/random_vectors.json)",
                        "no random-vector baseline (vectors/random_vectors.json; re-run the vectors stage): "
                        "no interval" + writer_text, models)
    try:
        scorer = ctx.scorer()
    except DpolensError as e:
        return Measured(None, None, len(top), f"scorer {ctx.scorer_name} unavailable",
                        f"scorer {ctx.scorer_name} unavailable ({e})" + writer_text, models)
    texts_top = [[t.strip() or t for t in r["top_tokens"]] for r in top]
    texts_random = [[t.strip() or t for t in r["top_tokens"]] for r in random["rows"]]
    # the token writers are chosen for promoting the probe's top tokens: their lists are scored without those tokens
    # (and so are the random vectors' they are compared with), else the test would score the probe's tokens again
    chosen_for = {t.strip() or t for t in (writers or {}).get("probe_tokens", [])}
    texts_writers = [ts for r in (writers["rows"][:TOP_VECTORS] if writers else [])
                     if (ts := [t.strip() or t for t in r["top_tokens"] if (t.strip() or t) not in chosen_for])]
    texts_random_w = [ts for r in texts_random if (ts := [t for t in r if t not in chosen_for])]
    flat = [t for ts in texts_top + texts_random + texts_writers + texts_random_w for t in ts]
    tox = iter(scorer.score(flat).toxicity.tolist())
    per_top = [float(np.mean([next(tox) for _ in ts])) for ts in texts_top]
    per_random = [float(np.mean([next(tox) for _ in ts])) for ts in texts_random]
    per_writer = [float(np.mean([next(tox) for _ in ts])) for ts in texts_writers]
    per_random_w = [float(np.mean([next(tox) for _ in ts])) for ts in texts_random_w]
    r = unpaired_bootstrap(per_random, per_top, ctx.n_boot, ctx.seed)
    ours = (f"mean toxicity of the top-{len(top)} cosine vectors' top tokens {num(r['mean_b'])} vs "
            f"{num(r['mean_a'])} for {len(per_random)} random value vectors (seed {random['seed']}): "
            f"{num(r['diff'])} {interval(r['ci95'])}")
    most = max(range(len(top)), key=lambda i: per_top[i])
    diag = (f"top-{len(top)} tokens {num(r['mean_b'])} vs random {num(r['mean_a'])}, {num(r['diff'])} "
            f"{interval(r['ci95'])}; most toxic: L{top[most]['layer']}.{top[most]['neuron']} "
            f"({', '.join(texts_top[most][:5])})" + writer_text)
    data = {"random_vectors": random["n"], "random_seed": random["seed"], "tokens_per_vector":
            len(texts_top[0]) if texts_top else 0}
    m = Measured(r["diff"], r["ci95"], len(top), ours, diag, models, scorer.describe(), data)
    if per_writer:  # the same statistic for the token writers, the ranking the rows resting on this one report too
        w = unpaired_bootstrap(per_random_w, per_writer, ctx.n_boot, ctx.seed)
        text = (f"the top-{len(per_writer)} token writers' top tokens, less the {len(chosen_for)} probe tokens they "
                f"were chosen for, {num(w['mean_b'])} vs random {num(w['mean_a'])}: {num(w['diff'])} "
                f"{interval(w['ci95'])}")
        m.alternatives["token-writers"] = Measured(w["diff"], w["ci95"], len(per_writer), text, text, models,
                                                   scorer.describe(), data)
        m.ours += f"; {text}"
    return m


CLAIMS = (
    Claim("vectors_toxic_tokens", "Lee", "the value vectors most cosine-similar to the probe project to toxic tokens",
          PAPER, +1,
          f"effect = mean toxicity (run's scorer) of the top-{TOP_VECTORS} vectors' top tokens − that of random "
          "value vectors (bootstrap over vectors); paper: > 0",
          ("toxic_vectors.json", "random_vectors.json"), vectors_toxic_tokens),
)


def describe(s: VectorsSummary) -> str:
    """The CLI's Table 1: the top 10 value vectors and their top tokens."""
    return "\n".join(f"L{r['layer']:>2} n{r['neuron']:<5} cos {r['cosine']:.3f}  {r['top_tokens'][:8]}"
                     for r in s["top10"])

"""How the aligned model avoids toxicity (paper section 5, method.md 5.3): weight shift, logit
lens, activation drop, the residual offset δx, and the value-vector shifts behind it.

Activation statistics come from one KV-cached generation pass per model and one teacher-forced
forward over the generated tokens, accumulated as fp32 sums (never per-token lists). "Same
tokens": the base model's continuation is fed to both models; "own": each model's own
continuation. Only continuation positions count (selected by position, never by pad id).

Intervals are seeded bootstraps over prompts (per-prompt reductions, paired base vs aligned on the
same tokens), except where a statistic is a property of neurons (value-vector shifts): its `unit`
says so. On gated MLPs the top toxic neurons' mean activation can be negative, so the activation
drop is reported both raw (the paper's m) and signed, m · cos(v, probe): the neurons' contribution
along the probe, which is what "the toxic neurons write less toxicity" means whatever the sign.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np
import torch
from tqdm.auto import tqdm

from dpolens import memo
from dpolens.activations import Stats, continuation_stats
from dpolens.artifacts import DpolensError, read_json, write_json, write_manifest
from dpolens.compare import (
    OffsetLayer,
    OffsetStats,
    ValueShiftStats,
    WeightShiftSummary,
    check_pair,
    draw_mean,
    offset_stats,
    placebo,
    residual_offset,
    value_shift_stats,
    vs_control,
    vs_placebos,
    weight_shift,
)
from dpolens.config import RunSettings, at_least
from dpolens.data import default_data, load_prompts, wikitext_prompts
from dpolens.directions import load_probe, load_vectors, read_direction, signs_of
from dpolens.evaluate import paired_bootstrap, percentile_ci, resample_units
from dpolens.ledger import (Claim, Measured, StageContext, growth, identity, interval, num, offset_control, pct,
                            pct_interval, stat_block)
from dpolens.model import hooks
from dpolens.model.generation import encode_prompts, generate, left_pad, length_batches, position_ids
from dpolens.model.loading import LoadedModel, load_model
from dpolens.webpage import image

log = logging.getLogger(__name__)

LENS_PROMPT_TOKENS = 32  # logit-lens prompts are cut like the harness's challenge prompts


@dataclass
class AnalyzeConfig(RunSettings):
    base: str = "gemma-3-270m"
    aligned: str = "runs/dpo/model"
    probe: str = "runs/probe"
    vectors: str = "runs/vectors"
    out: str = "runs/analyze"
    prompts: str = field(default_factory=lambda: default_data("rtp/challenge_prompts.jsonl"))
    limit: int | None = 200
    holdout: int = 0  # prompts left out (data.holdout_split): the DPO strength control's dev prompts (eval.holdout)
    lens_token: str = " shit"
    lens_search: list[str] = field(default_factory=lambda: [default_data("wikitext-2-raw/wiki.test.raw")])
    lens_search_limit: int = 2000  # challenge prompts first, then WikiText sentences
    top_neurons: int = 16
    max_new_tokens: int = 20
    max_prompt_tokens: int = 32
    batch_size: int = 32
    figure_layers: int = 3
    n_boot: int = 2000
    # the direction δx is compared with (directions.read_direction): standardized, the one the probe reads (γ ⊙ w,
    # after the final norm's gain); raw, the probe vector w itself (the paper's)
    space: Literal["raw", "standardized"] = "standardized"
    # the control alignment every statistic is also measured for, on the same tokens: placebo (the base plus
    # seeded noise of the aligned model's size, tensor by tensor), a model folder, or none
    control: str | None = "placebo"
    control_draws: int = 5  # placebos (seeds seed..seed+K-1); intervals resample the draws too
    # also measure the activation drop for the top `top_neurons` token writers (vectors/token_writers.json), which
    # the ledger reports where the cosine ranking's precondition (its vectors' tokens are toxic) fails
    writers: bool = True
    # a folder where the base model's continuations, activation statistics and logit lens search are kept and read
    # back (dpolens.memo): the strengths of a study's dose_response share them. `dpolens run` sets
    # runs/<name>/evals; not in the stage's key (it decides no number)
    cache: str | None = field(default=None, metadata={"in_key": False})

    def __post_init__(self):
        super().__post_init__()
        at_least(self, 1, "limit", "lens_search_limit", "top_neurons", "control_draws")
        at_least(self, 0, "holdout")


class NeuronActivation(TypedDict):
    """One top toxic neuron's mean activation m over continuation tokens."""

    layer: int
    neuron: int
    cosine: float  # the cosine the vectors stage ranked it by
    base: float
    aligned_same_tokens: float  # the base model's continuations teacher-forced into the aligned model
    aligned_own_tokens: float


class PairedDrop(TypedDict):
    """Means over prompts of per-prompt means, paired bootstrap of aligned − base; None: no prompt had tokens."""

    base: float | None
    aligned: float | None
    diff: float | None
    ci95: list[float] | None
    n: int  # prompts


class ActivationMeans(TypedDict):
    """The top toxic neurons' mean raw activation m (what results.json shows)."""

    mean_base: float
    mean_aligned: float  # on the base model's tokens
    mean_aligned_own_tokens: float


class ActivationDrop(ActivationMeans):
    tokens: str  # what mean_aligned and mean_aligned_own_tokens are measured on
    n_neurons: int
    per_neuron: list[NeuronActivation]
    raw: PairedDrop  # mean m
    signed: PairedDrop  # mean (m/s) · cos(v, probe): the contribution along the probe, after post-norms
    verdict_uses: str  # "signed"
    definition: str
    per_prompt: dict[str, list[Any]]  # raw_/signed_ base/aligned per-prompt means (None: no tokens), n_tokens


class ValueShiftVsOffset(TypedDict):
    median_cosine_by_layer: dict[str, float]  # earlier layer j -> median over its neurons of cos(Δv_j, δx̂_l)
    share_negative: float | None  # share of those cosines below 0, all earlier layers


class LensSearch(TypedDict):
    token: str  # the lens token
    n_prompts: int  # prompts after which the base model's greedy next token is `token`
    prompts: list[str]  # the first 20 of them


class LogitLens(LensSearch, total=False):  # only `LensSearch` when no prompt was found
    labels: list[str]  # sub-layers: "<l>_mid" after attention, "<l>" after the MLP
    base: list[float]  # mean probability of `token` read out there
    aligned: list[float]


class AnalysisResult(TypedDict):
    """What `run_analyze` returns and writes to analysis.json."""

    weight_shift: WeightShiftSummary
    activation_drop: ActivationDrop
    offset: list[OffsetLayer]  # per layer, on the base model's tokens, all prompts token-weighted
    offset_stats: OffsetStats
    logit_lens: LogitLens
    value_shift_vs_offset: dict[str, ValueShiftVsOffset]  # per figure layer l
    value_shift_stats: ValueShiftStats
    figures: list[str]  # file names in the stage folder
    n_prompts: int
    base: dict[str, Any]  # LoadedModel.identity()
    aligned: dict[str, Any]


class AnalysisHeadline(TypedDict, total=False):  # empty without analysis.json
    activation_drop: ActivationMeans
    offset: list[OffsetLayer]


def per_prompt_means(st: Stats, weights: torch.Tensor, residual: bool = False,
                     cols: slice = slice(None)) -> list[float | None]:
    """Per prompt, the mean over its continuation tokens of the chosen neurons' weighted mean
    activation (1/N Σ_i w_i m_i; `residual`: of m_i/s, the activation as it reaches the residual after
    a post-MLP norm, method.md section 0); None for a prompt without continuation tokens. weights: [N],
    for the neurons `cols` of the stats' neuron list."""
    sums = ((st.per_prompt_neuron_ms if residual else st.per_prompt_neuron_m)[:, cols] * weights).mean(1)
    return [float(s / n) if n > 0 else None for s, n in zip(sums, st.prompt_tokens)]


def paired_drop(base: list[float | None], aligned: list[float | None], n_boot: int, seed: int) -> PairedDrop:
    """Paired bootstrap over the prompts that have continuation tokens: base, aligned, aligned − base."""
    keep = [i for i, x in enumerate(base) if x is not None]
    if not keep:
        return {"base": None, "aligned": None, "diff": None, "ci95": None, "n": 0}
    r = paired_bootstrap([base[i] for i in keep], [aligned[i] for i in keep], n_boot, seed)
    return {"base": r["mean_a"], "aligned": r["mean_b"], "diff": r["diff"], "ci95": r["ci95"], "n": r["n"]}


def paired_vs_draws(base: list[float | None], aligned: list[float | None], controls: list[list[float | None]],
                    n_boot: int, seed: int) -> dict:
    """The controls' change (control − base) and aligned − control, paired over the prompts with
    continuation tokens; the control is the mean over its K draws, which each replicate resamples too
    (compare.draw_mean)."""
    keep = [i for i, x in enumerate(base) if x is not None]
    if not keep:
        return {"signed": {"diff": None, "ci95": None, "n": 0}, "vs_control": {"diff": None, "ci95": None, "n": 0}}
    b, al = np.array([base[i] for i in keep]), np.array([aligned[i] for i in keep])
    c = np.array([[ctl[i] for i in keep] for ctl in controls])  # [K, n]
    idx = resample_units(len(keep), n_boot, seed)  # [n_boot, n]
    ctl_change = draw_mean((c - b)[:, idx].mean(-1), seed)
    diff, ci = vs_placebos(al.mean(), al[idx].mean(-1), c.mean(1), c[:, idx].mean(-1))
    return {"signed": {"diff": float((c - b).mean()), "ci95": percentile_ci(ctl_change), "n": len(keep),
                       "per_draw": (c - b).mean(1).tolist()},
            "vs_control": {"diff": diff, "ci95": ci, "n": len(keep), "interval": "prediction (vs_placebos)"},
            "draws": len(controls)}


def single_token(lm: LoadedModel, text: str) -> int:
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [lm.tokenizer.decode([i]) for i in ids]
        raise DpolensError(f"analysis token {text!r} is not a single token: it splits into {pieces}")
    return ids[0]


# ---- logit lens ----------------------------------------------------------------------------------

@torch.inference_mode()
def find_lens_prompts(lm: LoadedModel, texts: list[str], token_id: int, batch_size: int) -> list[str]:
    """Texts after which the model's greedy next token is `token_id`."""
    found = []
    ids_all = encode_prompts(lm, texts, LENS_PROMPT_TOKENS)
    for idx in tqdm(length_batches([len(x) for x in ids_all], batch_size), desc="logit-lens search", unit="batch"):
        ids, mask = left_pad([ids_all[i] for i in idx], lm.tokenizer.pad_token_id, lm.device)
        last = lm.adapter.body(input_ids=ids, attention_mask=mask,
                               position_ids=position_ids(mask)).last_hidden_state[:, -1]
        pred = lm.adapter.logits(last, apply_norm=False).argmax(-1)
        found += [texts[i] for row, i in enumerate(idx) if int(pred[row]) == token_id]
    return found


@torch.inference_mode()
def logit_lens(lm: LoadedModel, prompts: list[str], token_id: int) -> dict:
    """Mean probability of `token_id` read out after each attention (mid) and MLP (post) sub-layer."""
    a = lm.adapter
    points = [(l, p) for l in range(a.n_layers) for p in ("resid_mid", "resid_post")]
    sums = {pt: 0.0 for pt in points}
    for start in range(0, len(prompts), 16):
        ids, mask = left_pad(encode_prompts(lm, prompts[start:start + 16], LENS_PROMPT_TOKENS),
                             lm.tokenizer.pad_token_id, lm.device)
        with hooks.capture(a, points) as store:
            a.body(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
        for pt in points:
            x = store[pt][0][:, -1]
            sums[pt] += float(a.logits(x).float().softmax(-1)[:, token_id].sum())
    n = max(len(prompts), 1)
    return {"labels": [f"{l}{'_mid' if p == 'resid_mid' else ''}" for l, p in points],
            "prob": [sums[pt] / n for pt in points]}


# ---- the stage -----------------------------------------------------------------------------------

def run_analyze(cfg: AnalyzeConfig) -> AnalysisResult:
    from dpolens import figures

    cfg.require_float32("base and aligned are compared")
    prompts = load_prompts(cfg.prompts, cfg.limit, holdout=cfg.holdout)  # inputs read before any model or output
    tv = load_vectors(cfg.vectors)[: cfg.top_neurons]
    wv = ((read_json(Path(cfg.vectors) / "token_writers.json") or {}).get("rows") or [])[: cfg.top_neurons] \
        if cfg.writers else []
    base = load_model(cfg.base, dtype=cfg.dtype, device=cfg.device)
    aligned = load_model(cfg.aligned, dtype=cfg.dtype, device=cfg.device)
    check_pair(base, aligned)
    given = None  # a control model folder: loaded and checked before any compute
    if cfg.control and cfg.control != "placebo":
        given = load_model(cfg.control, dtype=cfg.dtype, device=cfg.device)
        check_pair(base, given)
    probe, meta = load_probe(cfg.probe, base)
    token_id = single_token(base, cfg.lens_token)
    a = base.adapter
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    w_hat = read_direction(base, probe, cfg.space)

    shift = weight_shift(base.model, aligned.model)
    write_json(out / "weight_shift.json", shift)

    top = [(r["layer"], r["neuron"]) for r in tv]
    # [N] each neuron's sign (gated MLPs: from the probe's toxic texts, directions.toxic_scores; else 1) and the
    # cosine of its value vector v itself, so that m·sign and m·cos(v) do not depend on a gated neuron's convention
    signs = torch.tensor([float(r.get("sign", 1)) for r in tv])
    cosines = torch.tensor([r["cosine"] for r in tv]) * signs
    # the token writers, measured in the same passes: their sign as the vectors stage recorded it (rows before it
    # did: the probe's), their `cosine` the signed score (cosine · sign) as the toxic vectors'
    writers = [(r["layer"], r["neuron"]) for r in wv]
    all_signs = signs_of(base, meta)
    w_signs = torch.tensor([float(r.get("sign", all_signs[l, n])) for r, (l, n) in zip(wv, writers)])
    w_cosines = torch.tensor([r["cosine"] for r in wv]) * w_signs
    if cfg.writers and len(wv) < cfg.top_neurons:
        log.warning("token_writers.json lists %d writers, fewer than top_neurons %d: the writers' activation drop "
                    "is measured on %d", len(wv), cfg.top_neurons, len(wv))
    tops, wcols = slice(0, len(top)), slice(len(top), len(top) + len(writers))
    neurons = top + writers
    fig_layers = sorted({l for l, _ in top[: cfg.figure_layers]})
    all_layers = range(a.n_layers)

    gen_kw = dict(batch_size=cfg.batch_size, max_prompt_tokens=cfg.max_prompt_tokens, head_screen="auto")
    gens = {"base": memo.generations(cfg.cache, base, prompts, cfg.max_new_tokens, desc="generate base", **gen_kw),
            "aligned": generate(aligned, prompts, cfg.max_new_tokens, desc="generate aligned", **gen_kw)}
    same = [(g.prompt_ids, g.continuation_ids) for g in gens["base"]]
    stats = {
        ("base", "same"): memo.stats(cfg.cache, base, same, fig_layers, cfg.batch_size, "base, base tokens",
                                     x_layers=all_layers, neurons=neurons),
        ("aligned", "same"): continuation_stats(aligned, same, fig_layers, cfg.batch_size, "aligned, base tokens",
                                                x_layers=all_layers, neurons=neurons),
        ("aligned", "own"): continuation_stats(aligned, [(g.prompt_ids, g.continuation_ids) for g in gens["aligned"]],
                                                 fig_layers, cfg.batch_size, "aligned, own tokens"),
    }
    # the control draws, one model at a time: their stats on the base tokens and their value shifts
    controls, control_ids = [], []
    for k in range(cfg.control_draws if cfg.control == "placebo" else 1 if cfg.control else 0):
        c = given or placebo(base, aligned, cfg.seed + k)
        st = continuation_stats(c, same, (), cfg.batch_size, f"control {k}, base tokens", x_layers=all_layers,
                                neurons=neurons)
        dvc = {j: c.adapter.value_vectors(j).float() - a.value_vectors(j).float() for j in range(a.n_layers)}
        controls.append((st, value_shift_stats(dvc, st.mean_x - stats[("base", "same")].mean_x, st.mean_m_over_s,
                                               cfg.n_boot, cfg.seed + 1 + k, replicates=True)))
        control_ids.append(c.identity())
        del c
    mean_m = {k: s.mean_m for k, s in stats.items()}
    per_neuron = [{"layer": l, "neuron": n, "cosine": r["cosine"], "sign": int(sg),
                   "base": float(sg * mean_m[("base", "same")][l, n]),
                   "aligned_same_tokens": float(sg * mean_m[("aligned", "same")][l, n]),
                   "aligned_own_tokens": float(sg * mean_m[("aligned", "own")][l, n]),
                   # sign · m/s: the activation as it reaches the residual (after a post-MLP norm)
                   "residual_base": float(sg * stats[("base", "same")].mean_m_over_s[l, n]),
                   "residual_aligned_same_tokens": float(sg * stats[("aligned", "same")].mean_m_over_s[l, n])}
                  for (l, n), r, sg in zip(top, tv, signs.tolist())]
    drop = {"mean_base": float(np.mean([r["base"] for r in per_neuron])),
            "mean_aligned": float(np.mean([r["aligned_same_tokens"] for r in per_neuron])),
            "mean_aligned_own_tokens": float(np.mean([r["aligned_own_tokens"] for r in per_neuron])),
            "tokens": "mean_aligned: the base model's continuations teacher-forced into the aligned model; "
                      "mean_aligned_own_tokens: the aligned model's own continuations",
            "n_neurons": len(per_neuron), "per_neuron": per_neuron}
    sb, sa = stats[("base", "same")], stats[("aligned", "same")]
    per_prompt = {"raw_base": per_prompt_means(sb, signs, cols=tops), "raw_aligned": per_prompt_means(sa, signs, cols=tops),
                  "signed_base": per_prompt_means(sb, cosines, True, tops),
                  "signed_aligned": per_prompt_means(sa, cosines, True, tops),
                  "n_tokens": [int(n) for n in sb.prompt_tokens]}
    drop.update({"raw": paired_drop(per_prompt["raw_base"], per_prompt["raw_aligned"], cfg.n_boot, cfg.seed),
                 "signed": paired_drop(per_prompt["signed_base"], per_prompt["signed_aligned"], cfg.n_boot, cfg.seed),
                 "verdict_uses": "signed",
                 "definition": "raw: mean m · sign of the top neurons (sign: 1, or on a gated MLP the sign of the "
                             "neuron's mean activation on the probe's toxic texts); signed: mean (m/s) · cos(v, probe), "
                             "their contribution along the probe as it reaches the residual (s: the post-MLP norm's "
                             "scale, 1 without one). Means over prompts of per-prompt means over continuation tokens "
                             "(same tokens), paired bootstrap over prompts of aligned − base",
                 "per_prompt": per_prompt})
    if controls:
        drop["control"] = paired_vs_draws(per_prompt["signed_base"], per_prompt["signed_aligned"],
                                          [per_prompt_means(st, cosines, True, tops) for st, _ in controls], cfg.n_boot,
                                          cfg.seed)
    if writers:
        # the writers are chosen for the tokens they promote, not for their cosine with the probe (which is small and
        # of either sign): the verdict reads their activation as it reaches the residual, (m/s)·sign, equally
        # weighted; (m/s)·cos(v, probe), the toxic neurons' statistic, is kept beside it
        drop["writers"] = {"neurons": [{"layer": l, "neuron": n, "sign": int(sg), "cosine": float(c)}
                                       for (l, n), sg, c in zip(writers, w_signs.tolist(), w_cosines.tolist())],
                           "verdict_uses": "activation",
                           "definition": "the top token writers (vectors/token_writers.json). activation: mean (m/s)·sign "
                                         "(sign: the neuron's sign on the probe's toxic texts, 1 on a GELU MLP); "
                                         "signed: mean (m/s)·cos(v, probe), as for the toxic neurons"}
        for kind, weights in (("activation", w_signs), ("signed", w_cosines)):
            wb, wa = per_prompt_means(sb, weights, True, wcols), per_prompt_means(sa, weights, True, wcols)
            drop["writers"][kind] = paired_drop(wb, wa, cfg.n_boot, cfg.seed)
            if controls:
                drop["writers"][f"control_{kind}"] = paired_vs_draws(
                    wb, wa, [per_prompt_means(st, weights, True, wcols) for st, _ in controls], cfg.n_boot, cfg.seed)

    xb, xa = sb.mean_x, sa.mean_x
    delta = xa - xb  # δx^l at resid_mid, same tokens
    offset = residual_offset(xb, xa, w_hat)
    offset_ci = offset_stats(sb, sa, w_hat, offset, cfg.n_boot, cfg.seed, controls=[st for st, _ in controls])

    search = (load_prompts(cfg.prompts, holdout=cfg.holdout) + wikitext_prompts(cfg.lens_search))[: cfg.lens_search_limit]
    lens_prompts = memo.value(cfg.cache, base, "lens_search", [search, token_id, cfg.batch_size],
                              lambda: find_lens_prompts(base, search, token_id, cfg.batch_size))
    lens = {"token": cfg.lens_token, "n_prompts": len(lens_prompts), "prompts": lens_prompts[:20]}
    if lens_prompts:
        lb = memo.value(cfg.cache, base, "logit_lens", [lens_prompts, token_id],
                        lambda: logit_lens(base, lens_prompts, token_id))
        la = logit_lens(aligned, lens_prompts, token_id)
        lens.update({"labels": lb["labels"], "base": lb["prob"], "aligned": la["prob"]})

    dv = {j: (aligned.adapter.value_vectors(j).float() - a.value_vectors(j).float()) for j in range(a.n_layers)}
    shifts = {}
    for l in fig_layers:
        d = delta[l] / delta[l].norm().clamp(min=1e-30)
        shifts[l] = {j: (dv[j] @ d / dv[j].norm(dim=-1).clamp(min=1e-30)).numpy() for j in range(l)}
    base_mean_m = mean_m[("base", "same")].numpy()
    shift_ci = value_shift_stats(dv, delta, sa.mean_m_over_s, cfg.n_boot, cfg.seed, replicates=bool(controls))
    if controls:
        shift_ci["vs_control"] = {k: vs_control(shift_ci[k], [sh[k] for _, sh in controls], cfg.seed)
                                  for k in ("share_anti_aligned", "contribution_along_offset")}

    figs = figures.analysis_figures(out, lens, drop, offset, stats, fig_layers, top, delta, shifts, base_mean_m,
                                    base.ref, aligned.ref)
    result = {"weight_shift": {k: v for k, v in shift.items() if k != "per_tensor"},
              "activation_drop": drop, "offset": offset, "offset_stats": offset_ci, "logit_lens": lens,
              "value_shift_vs_offset": {str(l): {"median_cosine_by_layer": {str(j): float(np.median(c))
                                                                             for j, c in s.items()},
                                                 "share_negative": float(np.mean(np.concatenate(list(s.values())) < 0))
                                                 if s else None}
                                        for l, s in shifts.items()},
              "value_shift_stats": shift_ci,
              "figures": figs, "n_prompts": len(prompts), "base": base.identity(), "aligned": aligned.identity(),
              "control": {"kind": cfg.control, "draws": len(controls), "seeds": list(range(cfg.seed, cfg.seed +
                                                                                              len(controls))),
                          "models": control_ids} if controls else None}
    write_json(out / "analysis.json", result)
    write_manifest(out, "analyze", cfg, base=base.identity(), aligned=aligned.identity())
    return result


def headline(folder: Path) -> AnalysisHeadline:
    """The toxic neurons' activations and the residual offset, for results.json."""
    if not (a := read_json(folder / "analysis.json")):
        return {}
    return {"activation_drop": {k: a["activation_drop"][k] for k in ("mean_base", "mean_aligned",
                                                                     "mean_aligned_own_tokens")},
            "offset": a["offset"]}


def section(folder: Path, headline: AnalysisHeadline, manifest: dict) -> str:
    if not folder.exists():
        return ""
    parts = ["<h2>How the aligned model avoids toxicity (paper 5)</h2>",
             image(folder / "fig1_logit_lens.png", "Figure 1: probability of the toxic token read out after every "
                                                   "sub-layer, base vs aligned."),
             image(folder / "fig2_activation_drop.png", "Figure 2: mean activation of the top toxic neurons, base "
                                                        "vs aligned."),
             image(folder / "fig_offset_by_layer.png", "Size of the residual offset δx per layer and its cosine "
                                                       "with the probe.")]
    parts += [image(f, "Figure 4: residuals projected on δx̂ and PC1; dotted lines join a prompt.")
              for f in sorted(folder.glob("fig4_projection_L*.png"))]
    parts += [image(f, "Figures 5, 7-10: cosine of earlier layers' value-vector shifts with δx, beside their mean "
                       "activations.") for f in sorted(folder.glob("fig5_value_shifts_L*.png"))]
    return "".join(parts)


# ---- claims --------------------------------------------------------------------------------------

def _prov(a: dict) -> dict:
    return dict(models={"base": identity(a.get("base")), "aligned": identity(a.get("aligned"))},
                data={"n_prompts": a.get("n_prompts")})


def activation_drop(ctx: StageContext) -> Measured:
    a = ctx.json("analysis.json")
    d = a["activation_drop"]
    raw, signed = d.get("raw"), d.get("signed")
    sign_text = (f"the top {d.get('n_neurons')} toxic neurons' mean raw activation is "
                 f"{'negative' if d['mean_base'] < 0 else 'non-negative'} in the base ({num(d['mean_base'], 5)})")
    raw_text = (f"raw activation {num(raw['base'], 5)} → {num(raw['aligned'], 5)}, Δ {num(raw['diff'], 5)} "
                f"{interval(raw['ci95'], 5)}" if raw else
                f"raw activation {num(d['mean_base'], 5)} → {num(d['mean_aligned'], 5)} (same tokens)")
    if not signed:
        return Measured(d["mean_aligned"] - d["mean_base"], None, a.get("n_prompts"), raw_text,
                        f"no per-prompt interval (analysis.json activation_drop.signed); {raw_text}; {sign_text}",
                        **_prov(a))
    what = "(m/s)·cos(v, w)" if "(m/s)" in d.get("definition", "") else "m·cos(v, w)"  # older analysis.json: m
    signed_text = (f"contribution along the probe ({what}) {num(signed['base'], 5)} → "
                   f"{num(signed['aligned'], 5)}, Δ {num(signed['diff'], 5)} {interval(signed['ci95'], 5)}")
    m = Measured(signed["diff"], signed["ci95"], signed["n"], f"{signed_text}; {raw_text}",
                 f"{signed_text}; {raw_text}; {sign_text}", **_prov(a))
    if (c := d.get("control")) and c["signed"]["diff"] is not None:
        m.against_placebo(c["signed"]["diff"], c["signed"]["ci95"], c["vs_control"]["diff"], c["vs_control"]["ci95"])
    if (w := d.get("writers")) and (ws := w.get("activation")) and ws.get("diff") is not None:
        text = (f"the top {len(w['neurons'])} token writers' activation (m/s)·sign {num(ws['base'], 5)} → "
                f"{num(ws['aligned'], 5)}, Δ {num(ws['diff'], 5)} {interval(ws['ci95'], 5)}")
        if (wc := w.get("signed")) and wc.get("diff") is not None:
            text += f" (their contribution along the probe Δ {num(wc['diff'], 5)} {interval(wc['ci95'], 5)})"
        alt = Measured(ws["diff"], ws["ci95"], ws["n"], text, text, **_prov(a))
        if (c := w.get("control_activation")) and c["signed"]["diff"] is not None:
            alt.against_placebo(c["signed"]["diff"], c["signed"]["ci95"], c["vs_control"]["diff"],
                                c["vs_control"]["ci95"])
        m.alternatives["token-writers"] = alt
        m.ours += f"; {text}"
    return m


def offset_grows(ctx: StageContext) -> Measured:
    a = ctx.json("analysis.json")
    m = growth(a["offset"], a.get("offset_stats"), a.get("n_prompts"), _prov(a), "analysis.json")
    return offset_control(m, a.get("offset_stats"), "slope")


def offset_away_from_toxic(ctx: StageContext) -> Measured:
    a = ctx.json("analysis.json")
    last = a["offset"][-1]
    cos, ci = stat_block(a.get("offset_stats"), "final_cosine_with_probe")
    if ci is None:
        text = f"cos(δx, probe) at layer {last['layer']}: {num(last['cosine_with_probe'])}"
        return Measured(last["cosine_with_probe"], None, a.get("n_prompts"), text,
                        f"no per-prompt interval (analysis.json offset_stats); {text}", **_prov(a))
    text = f"cos(δx, probe) at layer {last['layer']}: {num(cos)} {interval(ci)}"
    m = Measured(cos, ci, a["offset_stats"]["final_cosine_with_probe"].get("n"), text, text, **_prov(a))
    return offset_control(m, a.get("offset_stats"), "final_cosine_with_probe", 3)


def value_shifts_opposite(ctx: StageContext) -> Measured:
    a = ctx.json("analysis.json")
    stats = a.get("value_shift_stats")
    share, ci = stat_block(stats, "share_anti_aligned")
    if ci is None or share is None:
        shares = {l: v.get("share_negative") for l, v in (a.get("value_shift_vs_offset") or {}).items()}
        text = "share of value-vector shifts anti-aligned with δx: " + (
            ", ".join(f"layer {l}: {pct(s)}" for l, s in shares.items()) or "not measured")
        last = next(reversed(shares.values()), None) if shares else None
        return Measured(None if last is None else last - 0.5, None, None, text,
                        f"no interval (analysis.json value_shift_stats); {text}", **_prov(a))
    text = (f"{pct(share)} {pct_interval(ci)} of the shifted value vectors before layer "
            f"{stats.get('offset_layer')} point against δx there")
    m = Measured(share - 0.5, [c - 0.5 for c in ci], stats["share_anti_aligned"].get("n"), text,
                 f"share anti-aligned − 0.5 = {num(share - 0.5)} {interval([c - 0.5 for c in ci])}; {text}",
                 **_prov(a))
    return _shift_control(m, stats, "share_anti_aligned", -0.5)


def _shift_control(m: Measured, stats: dict, key: str, offset: float = 0.0) -> Measured:
    """`m` with the placebo's value-shift statistic and the difference (bootstraps over each model's neurons)."""
    d = (stats.get("vs_control") or {}).get(key)
    if not d or d["mean"] is None:
        return m
    c = d["control"]
    return m.against_placebo(c["mean"] + offset, [x + offset for x in c["ci95"]] if c["ci95"] else None, d["mean"],
                             d["ci95"])


def value_shifts_contribute(ctx: StageContext) -> Measured:
    a = ctx.json("analysis.json")
    stats = a.get("value_shift_stats")
    contrib, ci = stat_block(stats, "contribution_along_offset")
    if ci is None or contrib is None:
        return Measured(None, None, None, "not measured",
                        "no interval (analysis.json value_shift_stats.contribution_along_offset)", **_prov(a))
    text = (f"Σ m̄·Δv·δx̂ over the anti-aligned shifts {num(contrib, 5)} {interval(ci, 5)} "
            f"({stats['contribution_along_offset'].get('n')} neurons)")
    m = Measured(contrib, ci, stats["contribution_along_offset"].get("n"), text, text, **_prov(a))
    return _shift_control(m, stats, "contribution_along_offset")


PAPER = {"activation_drop": "Figure 2: mean activations of the top MLP.v_Toxic drop after DPO",
         "offset_grows": "Figures 3-4: DPO's collective small weight changes accumulate into an offset δx across "
                         "layers",
         "offset_away": "Figure 4: δx takes the residual out of the toxic keys' activation regions",
         "value_shifts_opposite": "Figure 5: approaching layer 19, most value vectors shift against δx^19",
         "value_shifts_contribute": "Figure 5: shifted value vectors contribute to δx because their activations are "
                                    "negative"}

CLAIMS = (
    Claim("toxic_neurons_activation_drop", "Lee", "the toxic neurons' activations drop after DPO",
          PAPER["activation_drop"], -1,
          "effect = signed contribution along the probe as it reaches the residual, (m/s)·cos(v, probe), aligned − "
          "base on the same tokens, "
          "paired over prompts (the raw activation m is reported too); paper: < 0. Token-writer ranking (reported "
          "beside it): the top token writers' activation (m/s)·sign, equally weighted",
          ("analysis.json",), activation_drop, mechanism=True,
          requires=("vectors_toxic_tokens",)),
    Claim("offset_grows", "Lee", "the residual offset δx grows over layers", PAPER["offset_grows"], +1,
          "effect = least-squares slope of ‖δx_l‖/‖x_l‖ over layers (bootstrap over prompts); paper: > 0",
          ("analysis.json",), offset_grows, mechanism=True),
    Claim("offset_away_from_toxic", "Lee", "the offset moves the residual away from the toxic direction",
          PAPER["offset_away"], -1, "effect = cos(δx at the last layer, probe) (bootstrap over prompts); paper: < 0",
          ("analysis.json",), offset_away_from_toxic, mechanism=True),
    Claim("value_shifts_opposite", "Lee", "value-vector shifts point opposite to the offset",
          PAPER["value_shifts_opposite"], +1,
          "effect = share of shifted value vectors with cos(Δv, δx) < 0, minus 0.5 (bootstrap over neurons); "
          "paper: > 0", ("analysis.json",), value_shifts_opposite, mechanism=True),
    Claim("value_shifts_contribute", "Lee",
          "the anti-aligned value shifts still add to the offset, through negative activations",
          PAPER["value_shifts_contribute"], +1,
          "effect = Σ over anti-aligned shifts of mean activation × Δv·δx̂ (bootstrap over neurons); "
          "paper: > 0",
          ("analysis.json",), value_shifts_contribute, mechanism=True),
)


def describe(r: AnalysisResult) -> str:
    """The CLI's summary of the analysis: weight shift, toxic neurons' activations, figures."""
    w, d = r["weight_shift"], r["activation_drop"]
    return "\n".join([f"weight shift: min cosine {w['min_cosine']:.6f}, mean norm diff {w['mean_norm_diff']:.3e}",
                      f"top toxic neurons: mean activation base {d['mean_base']:.4f} -> aligned "
                      f"{d['mean_aligned']:.4f}",
                      f"figures: {', '.join(f for f in r['figures'] if f.endswith('.png'))}"])

"""Neuron-level attribution of the toxicity reduction (Yang et al., method.md section 6).

For every neuron i of every layer and each model M: mean activation m̄_i(M) and the mean
projection of its exact residual contribution onto the probe direction,
p_i(M) = E_t[m_{i,t} / s_t] · (v_i · ŵ)  (s_t = 1, or the RMS of the raw MLP output on Gemma 2/3),
from one generation pass per model plus one teacher-forced forward, streamed in fp32.
Δ_i = p_i(base) − p_i(aligned) is neuron i's reduction of the toxicity projection.

Groups by the sign of cos(v_i, w) and of the base activation, among the neurons that reduce
the projection (Δ_i > 0), so that the four groups hold exactly the positive reduction; the
names give the activation change that produces it (activations in the units that scale the
contribution, m/s, = m when there is no post-norm):
  TP−  cos > 0, m̄ ≥ 0, activation decreases      TN+  cos > 0, m̄ < 0, becomes more negative
  AP+  cos < 0, m̄ ≥ 0, activation increases      AN−  cos < 0, m̄ < 0, becomes less negative
and the mirror groups (TP+, TN−, AP−, AN+) with the opposite change, which raise it.
Groups and patch values are fitted on one set of prompts (the head of the evaluation prompts, or
the DPO pairs' prompts: `fit_from`); patching and editing are evaluated on prompts outside it.
The shares carry 95% intervals from a seeded bootstrap over the fit prompts, with the groups held
as fitted (per-prompt sums of each neuron's projection are kept for that, n_prompts × n_layers ×
d_mlp fp32 per model, never per token). Patching (`patch`) sets each
patched neuron to its aligned mean activation at every position (`set`, method.md section 6),
or adds the mean change m̄_aligned − m̄_base to its own activation (`shift`, our addition): on
gated MLPs, where the groups hold most neurons, `set` makes every MLP nearly constant (measured
on gemma-3-270m: perplexity 10.5 → 5198 with all four groups), while `shift` moves the same
means and keeps each token's variation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np

from dpolens.activations import bootstrap_counts
from dpolens.artifacts import DpolensError, atomic_path, read_json, write_json, write_manifest
from dpolens.attribution import (GATED_GROUPS, assign_groups, crossfit_shares, dampened_toxic, group_names,
                                 group_shares, neuron_edits, neuron_table, set_sums)
from dpolens.compare import GROUPS, check_pair, draw_mean, placebo, vs_placebos
from dpolens.config import RunSettings, at_least
from dpolens.data import holdout_split, load_pairs, load_prompts
from dpolens.directions import load_probe, token_writer_ranking
from dpolens.evaluate import (EvalData, EvalInputs, evaluate_inputs, headline_rows, load_inputs, paired_bootstrap,
                              percentile_ci, resample_units)
from dpolens.ledger import (PPL_BOUND, Claim, Measured, NoUnits, StageContext, finite, gap_share, guarded, identity,
                            interval, more_than_half, num, pct, pct_interval, per_prompt, ppl_check, ppl_ratio,
                            ppl_text, ratio, stat_block)
from dpolens.model.loading import LoadedModel, load_model
from dpolens.webpage import image, table

log = logging.getLogger(__name__)

PATCH_ORDER = ("TP-", "AN-", "TN+", "AP+")
PATCH_RULES = {"set": "each group's neurons set to their aligned mean activation at every position",
               "shift": "each group's neurons shifted by their mean activation change (aligned − base) "
                        "at every position"}


@dataclass
class NeuronsConfig(RunSettings):
    base: str = "gemma-3-270m"
    aligned: str = "runs/dpo/model"
    probe: str = "runs/probe"
    out: str = "runs/neurons"
    fit_prompts: int = 200  # the first N prompts of the fit source fit groups and patch values
    # eval: the first fit_prompts evaluation prompts (evaluation on the rest); pairs: the first fit_prompts
    # distinct prompts of the DPO pairs, disjoint from the evaluation prompts (evaluation on all of them)
    fit_from: Literal["eval", "pairs"] = "eval"
    pairs: str = field(default="runs/pairs/pairs.jsonl", metadata={"in_key_if": ("fit_from", "pairs")})
    top_toxic: int = 128
    # where a neuron's contribution is projected and toxic neurons ranked (directions.toxic_scores, the ranking
    # every stage shares): standardized, along the direction the probe reads (γ ⊙ w); raw, along w (the paper's)
    space: Literal["raw", "standardized"] = "standardized"
    edit: bool = True  # evaluate tuning-free editing too (editing.json; one more evaluation, not in the ledger)
    edit_alpha: float = 0.05
    edit_beta: float = 0.5
    patch: Literal["set", "shift"] = "set"
    # cumulative: patch TP-, then TP-+AN-, ... (one evaluation per group, the paper's table); endpoint: all four
    # groups at once only, the row the claims ledger reads (saves three evaluations)
    patch_steps: Literal["cumulative", "endpoint"] = "cumulative"
    # the null of patching: as many random neurons as the groups hold, shifted by their own activation change
    # rescaled to the groups' shift norm (one more evaluation; the ledger's row needs the groups to beat it)
    patch_random: bool = True
    # the control of the two mechanism rows: the cross-fitted shares also for placebos (the base plus seeded noise of
    # the aligned model's size, tensor by tensor; one generation and one forward over the fit prompts each)
    control: Literal["placebo"] | None = "placebo"
    control_draws: int = 5  # placebos (seeds seed..seed+K-1); aligned − placebo uses a prediction interval
    # the cross-fitted toxic-neuron share also with the toxic neurons ranked as token writers (directions.
    # token_writer_scores: how much each value vector promotes the probe's top `writer_tokens` tokens), which the
    # ledger reports where the cosine ranking's precondition fails (numpy only: no generation)
    writers: bool = True
    writer_tokens: int = 10
    cluster_sample: int = 3000
    batch_size: int = 32
    max_new_tokens: int = 20
    n_boot: int = 2000
    eval: EvalData = field(default_factory=EvalData)  # evaluated on prompts outside the fit split

    def __post_init__(self):
        super().__post_init__()
        at_least(self, 1, "fit_prompts", "control_draws")


class Share(TypedDict):
    """A neuron set's part of the reduction Δ = Σ_i (p_i(base) − p_i(aligned)) of the probe projection."""

    count: int  # neurons
    reduction: float  # Σ Δ_i over the set
    share_of_positive: float | None  # reduction / Σ of the positive Δ_i; None when that is 0
    share_of_net: float | None  # reduction / Σ of all Δ_i; None when that is 0
    ci95_share_of_positive: list[float] | None  # bootstrap over fit prompts; None where the share is None
    ci95_share_of_net: list[float] | None


class GroupShare(Share):
    reduces_toxicity: bool  # one of the four groups (Δ_i > 0), not a mirror
    agreement: float | None  # share of the group's neurons whose activation moved as its name says


class ToxicNeuronShare(Share):
    top_n: int  # top_toxic
    definition: str


class NeuronGroups(TypedDict):
    """What results.json shows of groups.json."""

    groups: dict[str, GroupShare]  # the four groups and their mirrors, by name
    totals: dict[str, float]  # positive, net: Σ of the positive Δ_i and of all Δ_i
    toxic_neurons: ToxicNeuronShare  # the top_toxic neurons by cosine that were active and dampened


class GroupShares(NeuronGroups):
    """groups.json."""

    four_groups_share_of_positive: float | None
    bootstrap: dict[str, Any]  # how the intervals were made: unit, n, n_boot, seed, rule
    clustering: dict[str, Any]  # clustering_check(): adjusted_rand_index of clusters vs groups, ...
    fit: dict[str, Any]  # the fit split: prompts (file), from (eval | pairs), n_prompts, tokens (base continuation)


class Patching(TypedDict):
    """patching.json."""

    base: dict[str, Any]  # `model` and evaluate.EvalResult.row() on the evaluation prompts
    aligned: dict[str, Any]
    steps: list[dict[str, Any]]  # cumulative over PATCH_ORDER: groups, n_neurons and the patched base's row
    n_eval_prompts: int
    eval_offset: int  # evaluation prompts start here: fit_prompts when fitted on their head, else 0
    mode: str  # "set" or "shift"
    patch: str  # PATCH_RULES[mode]


class Editing(TypedDict):
    """editing.json: tuning-free editing of the base model."""

    alpha: float
    beta: float
    n_neurons: int  # neurons scaled
    rule: str
    base: dict[str, Any]  # as in Patching
    aligned: dict[str, Any]
    edited: dict[str, Any]  # evaluate.EvalResult.row() of the edited base model


class NeuronsResult(TypedDict):
    """What `run_neurons` returns."""

    groups: GroupShares
    patching: Patching
    editing: Editing | None  # None when edit is off
    figures: list[str]  # file names in the stage folder


class PatchingReference(TypedDict):
    base: dict[str, Any]  # patching.json's base and aligned rows without per-unit scores
    aligned: dict[str, Any]
    rule: str  # PATCH_RULES[mode]


class NeuronsHeadline(TypedDict, total=False):  # each part empty without its file
    neuron_groups: NeuronGroups
    patching: list[dict[str, Any]]  # patching.json's steps without per-unit scores
    patching_reference: PatchingReference


def group_intervals(t: dict[str, np.ndarray], labels: np.ndarray, top_toxic: int, n_boot: int = 2000,
                    seed: int = 0, gated: bool = False) -> dict:
    """95% intervals of each group's and the toxic neurons' share_of_positive and share_of_net, by a
    seeded bootstrap over the fit prompts (both models resampled with the same prompts). The neuron
    sets stay as fitted; each replicate recomputes their reductions from the resampled prompts'
    projection sums, token-weighted like the point values. Returns {set: {"ci95_share_of_positive",
    "ci95_share_of_net"}} for the eight groups and "toxic_neurons"."""
    toxic = np.zeros(len(labels), dtype=bool)
    toxic[dampened_toxic(t, top_toxic, gated)] = True
    reducing, mirrors = group_names(gated)
    sets = {**{g: labels == g for g in reducing + mirrors}, "toxic_neurons": toxic,
            "positive": np.isin(labels, reducing), "net": np.ones(len(labels), dtype=bool)}
    member = np.stack(list(sets.values()), 1).astype(np.float64)  # [n_neurons, n_sets]

    sums_b, sums_a = set_sums(t["prompt_p_base"], member), set_sums(t["prompt_p_aligned"], member)
    tok_b, tok_a = t["prompt_tokens_base"], t["prompt_tokens_aligned"]
    reductions = np.concatenate([counts @ sums_b / (counts @ tok_b)[:, None] - counts @ sums_a / (counts @ tok_a)[:, None]
                                 for counts in bootstrap_counts(len(tok_b), n_boot, seed)])  # [n_boot, n_sets]
    col = {k: i for i, k in enumerate(sets)}
    with np.errstate(divide="ignore", invalid="ignore"):
        return {k: {"ci95_share_of_positive": percentile_ci(reductions[:, col[k]] / reductions[:, col["positive"]]),
                    "ci95_share_of_net": percentile_ci(reductions[:, col[k]] / reductions[:, col["net"]])}
                for k in list(sets)[:-2]}


def scale_edits(t, sel: np.ndarray, factors: np.ndarray) -> list[dict]:
    """One `neurons` edit per (layer, factor): activations multiplied by the factor."""
    edits = []
    for layer in np.unique(t["layer"][sel]):
        for f in np.unique(factors[sel & (t["layer"] == layer)]):
            idx = np.where(sel & (t["layer"] == layer) & (factors == f))[0]
            edits.append({"kind": "neurons", "layer": int(layer), "neurons": t["neuron"][idx].tolist(),
                          "scale": float(f)})
    return edits


def clustering_check(t, labels: np.ndarray, sample: int, seed: int) -> dict:
    """Do unsupervised clusters of (cosine, activation change, projection change) recover the groups?"""
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import adjusted_rand_score

    grouped = np.where(labels != "")[0]
    rng = np.random.default_rng(seed)
    pick = rng.choice(grouped, size=min(sample, len(grouped)), replace=False)
    feats = np.stack([t["cosine"][pick], t["ms_aligned"][pick] - t["ms_base"][pick], t["delta"][pick],
                      t["ms_base"][pick]], 1)
    feats = (feats - feats.mean(0)) / feats.std(0).clip(min=1e-30)
    n = len(set(labels[pick]))
    pred = AgglomerativeClustering(n_clusters=n, linkage="ward").fit_predict(feats)
    return {"n_neurons": int(len(pick)), "n_clusters": int(n), "adjusted_rand_index": float(
        adjusted_rand_score(labels[pick].astype(str), pred)),
        "features": "cosine, activation change, projection change, base activation (standardised)"}


def fit_split(cfg: NeuronsConfig) -> tuple[list[str], int]:
    """The prompts that fit the groups, and how many evaluation prompts to skip so that none is evaluated
    on: the head of the evaluation prompts, or the DPO pairs' prompts (then every evaluation prompt stays)."""
    every = load_prompts(cfg.eval.prompts, None, cfg.eval.skip_bad_rows)
    eval_prompts = holdout_split(every, cfg.eval.holdout)[0]  # as load_inputs reads them
    if cfg.fit_from == "eval":
        if len(eval_prompts) <= cfg.fit_prompts:
            raise DpolensError(f"fit_prompts {cfg.fit_prompts} leaves no evaluation prompts: {cfg.eval.prompts} "
                               f"has {len(eval_prompts)}")
        return eval_prompts[: cfg.fit_prompts], cfg.fit_prompts
    prompts = list(dict.fromkeys(p["prompt_text"] for p in load_pairs(cfg.pairs, cfg.eval.skip_bad_rows)))
    held_out = set(every)  # the holdout's too
    fit = [p for p in prompts if p not in held_out][: cfg.fit_prompts]
    if len(fit) < cfg.fit_prompts:
        raise DpolensError(f"{cfg.pairs} has {len(fit)} distinct prompts outside the evaluation prompts; "
                           f"fit_prompts is {cfg.fit_prompts}")
    return fit, 0


def edit_neurons(cfg: NeuronsConfig, base: LoadedModel, inputs: EvalInputs, t: dict, labels: np.ndarray,
                 rows: dict) -> Editing:
    """Tuning-free editing (Yang et al.): per group, the share edit_beta of neurons with the largest
    reduction, their activations scaled towards the aligned model's, evaluated on the base."""
    factors = np.ones(len(labels))
    sel = np.zeros(len(labels), dtype=bool)
    down, up = 1 - cfg.edit_alpha, 1 + cfg.edit_alpha  # a scaling of m: the same whatever the sign convention
    for g, f in (("TP-", down), ("TN+", up), ("AP+", up), ("AN-", down), ("TP-/AN-", down), ("TN+/AP+", up)):
        idx = np.where(labels == g)[0]
        idx = idx[np.argsort(-t["delta"][idx])][: int(round(cfg.edit_beta * len(idx)))]
        sel[idx], factors[idx] = True, f
    res = evaluate_inputs(base, cfg.eval, inputs, scale_edits(t, sel, factors), label="edit")
    return {"alpha": cfg.edit_alpha, "beta": cfg.edit_beta, "n_neurons": int(sel.sum()),
            "rule": "per group, the share beta of neurons with the largest reduction; activations scaled by "
                    "(1 - alpha) for TP-/AN- and (1 + alpha) for TN+/AP+ (base model, no weight update)",
            "base": rows["base"], "aligned": rows["aligned"], "edited": res.row()}


def placebo_shares(cfg: NeuronsConfig, base: LoadedModel, aligned: LoadedModel, probe, probe_meta: dict,
                   fit_prompts: list[str], t: dict, cf: dict, gated: bool, writer_score: np.ndarray | None = None,
                   cf_writers: dict | None = None) -> tuple[dict, dict | None]:
    """The cross-fitted toxic-neuron share and smallest group share of `control_draws` placebos (the base plus
    noise of the aligned model's size per tensor), on the same fit prompts, split and bootstrap replicates as the
    aligned model's; aligned − placebo with `compare.vs_placebos`' prediction interval, the placebo's own
    interval over its replicates with a draw picked in each (`compare.draw_mean`, as `analyze`'s)."""
    draws, writer_draws = [], []
    for k in range(cfg.control_draws):
        c = placebo(base, aligned, cfg.seed + k)
        tc = neuron_table(base, c, probe, fit_prompts, cfg.batch_size, cfg.max_new_tokens, cfg.eval.progress,
                          meta=probe_meta, space=cfg.space, base_from=t, head_screen=cfg.eval.settings.screen)
        draws.append((c.identity(), crossfit_shares(tc, cfg.top_toxic, cfg.n_boot, cfg.seed, gated, n_random=0,
                                                    replicates=True)))
        if writer_score is not None:
            writer_draws.append((c.identity(), crossfit_shares({**tc, "toxic_score": writer_score}, cfg.top_toxic,
                                                               cfg.n_boot, cfg.seed, gated, n_random=0,
                                                               replicates=True)))
        del c, tc
    return (versus_draws(cfg, cf, draws),
            versus_draws(cfg, cf_writers, writer_draws) if writer_draws and cf_writers else None)


def versus_draws(cfg: NeuronsConfig, cf: dict, draws: list[tuple[dict, dict]]) -> dict:
    """The placebo block of a cross-fitted result `cf` from the draws' cross-fitted results (same replicates)."""
    out = {"kind": "placebo", "draws": len(draws), "models": [i for i, _ in draws],
           "four_groups_reduction": [d["four_groups_reduction"]["value"] for _, d in draws],
           "rule": "each placebo's groups and toxic neurons chosen and measured as the aligned model's (same halves, "
                   "same bootstrap replicates); aligned − mean placebo with a t(K−1) prediction interval"}
    where = {"toxic_neurons": ("toxic_neurons", "share"), "min": ("min", "share"),
             "min_reduction": ("min", "reduction"), "toxic_minus_half": ("toxic_neurons", "minus_half_four_groups")}
    for stat, (block, key) in where.items():
        point = cf[block].get(key)
        points = [d[block].get(key) for _, d in draws]
        if point is None or any(x is None for x in points):
            out[stat] = {"draws": points, "diff": None, "diff_ci95": None}
            continue
        reps = np.stack([d["_replicates"][stat] for _, d in draws])
        diff, ci = vs_placebos(point, cf["_replicates"][stat], points, reps)
        own = percentile_ci(draw_mean(reps, cfg.seed))
        out[stat] = {"draws": points, "mean": float(np.mean(points)), "ci95": own if all(map(finite, own)) else None,
                     "diff": diff, "diff_ci95": ci if all(map(finite, ci)) else None}
    return out


def run_neurons(cfg: NeuronsConfig) -> NeuronsResult:
    import pandas as pd

    from dpolens import figures

    cfg.require_float32("base and aligned are compared")
    fit_prompts, offset = fit_split(cfg)
    inputs = load_inputs(cfg.eval, offset=offset)  # disjoint from the fit split; read before any compute
    base = load_model(cfg.base, dtype=cfg.dtype, device=cfg.device)
    aligned = load_model(cfg.aligned, dtype=cfg.dtype, device=cfg.device)
    check_pair(base, aligned)
    probe, probe_meta = load_probe(cfg.probe, base)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t = neuron_table(base, aligned, probe, fit_prompts, cfg.batch_size, cfg.max_new_tokens, cfg.eval.progress,
                     meta=probe_meta, space=cfg.space, head_screen=cfg.eval.settings.screen,
                     cache=cfg.eval.cache)  # the base half kept in the run's cache: a dose-response's strengths share it
    gated = base.adapter.mlp_kind == "gated"  # the sign of m is then a convention: two sign-invariant groups
    labels = assign_groups(t, gated)
    df = pd.DataFrame({"layer": t["layer"], "neuron": t["neuron"], "cosine": t["cosine"],
                       "m_base": t["m_base"], "m_aligned": t["m_aligned"], "ms_base": t["ms_base"],
                       "ms_aligned": t["ms_aligned"], "p_base": t["p_base"], "p_aligned": t["p_aligned"],
                       "delta": t["delta"], "group": labels.astype(str)})
    with atomic_path(out / "neurons.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    shares = group_shares(t, labels, cfg.top_toxic, gated)
    for name, ci in group_intervals(t, labels, cfg.top_toxic, cfg.n_boot, cfg.seed, gated).items():
        target = shares["toxic_neurons"] if name == "toxic_neurons" else shares["groups"][name]
        for key, bounds in ci.items():  # no interval where the share itself is undefined (0 denominator)
            target[key] = bounds if target[key.removeprefix("ci95_")] is not None else None
    shares["bootstrap"] = {"unit": "fit prompts", "n": len(fit_prompts), "n_boot": cfg.n_boot, "seed": cfg.seed,
                           "rule": "groups held as fitted; each replicate recomputes the reductions from the "
                                   "resampled prompts' per-prompt projection sums (token-weighted); percentile"}
    shares["crossfit"] = crossfit_shares(t, cfg.top_toxic, cfg.n_boot, cfg.seed, gated, replicates=True)
    writer_score = None
    if cfg.writers:  # the same cross-fit with the toxic neurons ranked as token writers (in the base model)
        writer_score = token_writer_ranking(base, probe, cfg.writer_tokens, probe_meta).numpy()
        shares["crossfit_writers"] = crossfit_shares({**t, "toxic_score": writer_score}, cfg.top_toxic, cfg.n_boot,
                                                     cfg.seed, gated, replicates=True)
        shares["crossfit_writers"]["ranking"] = (f"token writers: mean z-score of the probe's top {cfg.writer_tokens} "
                                                 "tokens in each signed value vector's logit lens")
    if cfg.control == "placebo" and "_replicates" in shares["crossfit"]:
        ctl, ctl_w = placebo_shares(cfg, base, aligned, probe, probe_meta, fit_prompts, t, shares["crossfit"], gated,
                                    writer_score, shares.get("crossfit_writers"))
        shares["crossfit"]["control"] = ctl
        if ctl_w:
            shares["crossfit_writers"]["control"] = ctl_w
    for k in ("crossfit", "crossfit_writers"):
        if k in shares:
            shares[k].pop("_replicates", None)
    for k in ("prompt_p_base", "prompt_p_aligned"):
        del t[k]  # n_prompts × n_neurons: not needed past the intervals
    shares["clustering"] = clustering_check(t, labels, cfg.cluster_sample, cfg.seed)
    shares["fit"] = {"prompts": cfg.pairs if cfg.fit_from == "pairs" else cfg.eval.prompts, "from": cfg.fit_from,
                     "n_prompts": len(fit_prompts), "tokens": t["n_tokens_base"]}
    write_json(out / "groups.json", shares)

    rows = {}
    for label, m in (("base", base), ("aligned", aligned)):
        rows[label] = {"model": label, **evaluate_inputs(m, cfg.eval, inputs, label=label).row()}
    steps, chosen = [], np.zeros(len(labels), dtype=bool)
    how, values = ("value", t["m_aligned"]) if cfg.patch == "set" else ("shift", t["m_aligned"] - t["m_base"])
    order = GATED_GROUPS if gated else PATCH_ORDER
    for i, g in enumerate(order):
        chosen |= labels == g
        if cfg.patch_steps == "endpoint" and i < len(order) - 1:
            continue
        spec = neuron_edits(t, chosen, values, how)
        res = evaluate_inputs(base, cfg.eval, inputs, spec, label=f"patch {g}")
        steps.append({"groups": list(order[: i + 1]),
                      "n_neurons": int(chosen.sum()), **res.row()})
    random_patch = None
    if cfg.patch_random and chosen.any():
        rng = np.random.default_rng(cfg.seed)
        pick = np.zeros(len(labels), dtype=bool)
        pick[rng.choice(len(labels), int(chosen.sum()), replace=False)] = True
        shift = t["m_aligned"] - t["m_base"]
        norm_g, norm_r = float(np.linalg.norm(shift[chosen])), float(np.linalg.norm(shift[pick]))
        scale = norm_g / norm_r if norm_r > 0 else 0.0
        res = evaluate_inputs(base, cfg.eval, inputs, neuron_edits(t, pick, shift * scale, "shift"),
                              label="patch random")
        random_patch = {"n_neurons": int(pick.sum()), "overlap_with_groups": int((pick & chosen).sum()),
                        "scale": scale, "shift_norm": norm_g, "seed": cfg.seed,
                        "rule": "as many neurons as the groups, drawn uniformly; their own mean activation change "
                                "(aligned − base) rescaled to the groups' shift norm, added in the base", **res.row()}
    patching = {"base": rows["base"], "aligned": rows["aligned"], "steps": steps, "random": random_patch,
                "n_eval_prompts": len(inputs.prompts), "eval_offset": offset,
                "mode": cfg.patch, "patch": PATCH_RULES[cfg.patch]}
    write_json(out / "patching.json", patching)

    editing = edit_neurons(cfg, base, inputs, t, labels, rows) if cfg.edit else None
    if editing:
        write_json(out / "editing.json", editing)
    figs = figures.neuron_figures(out, t, labels, shares)
    write_manifest(out, "neurons", cfg, base=base.identity(), aligned=aligned.identity())
    return {"groups": shares, "patching": patching, "editing": editing, "figures": figs}


PAPER = {"toxic_share": "4.9% of the positive reduction (2.333 / 47.96); 32% of the net (7.22)",
         "groups": "four groups, two reducing toxicity and two promoting anti-toxicity, together 95.1% of the "
                   "reduction",
         "patching": "patching all four groups replicates DPO's toxicity reduction"}


def headline(folder: Path) -> NeuronsHeadline:
    """Group shares and the patching steps with their base/aligned references, for results.json."""
    r = {}
    if (g := read_json(folder / "groups.json")):
        r["neuron_groups"] = {"groups": g["groups"], "totals": g["totals"], "toxic_neurons": g["toxic_neurons"]}
    if (pt := read_json(folder / "patching.json")):
        r["patching"] = headline_rows(pt["steps"])
        base, aligned = headline_rows([pt["base"], pt["aligned"]])
        r["patching_reference"] = {"base": base, "aligned": aligned, "rule": pt["patch"]}
    return r


def section(folder: Path, headline: NeuronsHeadline, manifest: dict) -> str:
    parts, results = [], headline
    if (g := results.get("neuron_groups")):
        rows = [{"group": k, **v} for k, v in g["groups"].items()]
        parts += ["<h2>Neuron groups (Yang et al.)</h2>",
                  table(rows, ["group", "count", "reduction", "share_of_positive", "share_of_net"],
                        "Share of the reduction of the probe projection per neuron group."),
                  table([g["toxic_neurons"]], ["count", "share_of_positive", "share_of_net"],
                        f"Top toxic neurons that were active and dampened. Paper: {PAPER['toxic_share']}.")]
        parts += [image(folder / f"{f}.png", f.replace("fig_", "").replace("_", " ") + ".")
                  for f in ("fig_groups_by_layer", "fig_cumulative_share", "fig_neuron_scatter")]
    if (pt := results.get("patching")):
        ref = results.get("patching_reference") or {}
        rows = [{**ref[m], "groups": f"none ({m} model)"} for m in ("base", "aligned") if m in ref]
        rows += [{**s, "groups": "+".join(s["groups"])} for s in pt]
        rule = f" Patch: {ref['rule']}." if "rule" in ref else ""
        parts.append(table(rows, ["groups", "n_neurons", "toxicity", "perplexity", "f1"],
                           "Cumulative activation patching of the base model on held-out prompts." + rule))
    return "".join(parts)


# ---- claims --------------------------------------------------------------------------------------

def _prov(ctx: StageContext, n_prompts=None, fit: dict | None = None) -> dict:
    """The stage's models, scorer and data: the fit prompts (`fit`, groups.json's) or the evaluation's."""
    man = ctx.manifest()
    ev = man.get("config", {}).get("eval", {})
    prompts = (fit or {}).get("prompts") or ev.get("prompts")
    return dict(models={"base": identity(man.get("base")), "aligned": identity(man.get("aligned"))},
                scorer=ev.get("scorer"), data={"prompts": prompts, "n_prompts": n_prompts})


def _crossfit(g: dict) -> tuple[dict | None, str]:
    """groups.json's cross-fitted block, or None and why it cannot be used."""
    cf = g.get("crossfit") or {}
    if "min" not in cf:
        return None, ("not cross-fitted (groups.json before cross-fitting, or too few fit prompts): chosen and "
                      "measured on the same prompts, every group's share is positive by construction; no interval")
    red = cf["four_groups_reduction"]
    if not (red["ci95"] and red["ci95"][0] > 0):
        return None, (f"the groups chosen on half the prompts do not reduce the projection on the other half "
                      f"({num(red['value'], 5)} {interval(red['ci95'], 5)}): their shares have no meaning")
    return cf, ""


def toxic_neurons_small_share(ctx: StageContext) -> Measured:
    g = ctx.json("groups.json")
    tn = g["toxic_neurons"]
    pos, pos_ci = stat_block(tn, "share_of_positive")
    net, net_ci = stat_block(tn, "share_of_net")
    text = (f"in-sample: {tn['count']} of the top {tn.get('top_n')} toxic neurons active and dampened, {pct(pos)} "
            f"{pct_interval(pos_ci)} of the positive reduction, {pct(net)} {pct_interval(net_ci)} of the net")
    prov = _prov(ctx, (g.get("fit") or {}).get("n_prompts"), g.get("fit"))
    cf, why = _crossfit(g)
    if cf is None:
        return Measured(None if pos is None else pos - 0.5, None, None, text, f"{why}; {text}", **prov)
    m = _toxic_share(cf, text, prov)
    cfw, _ = _crossfit({"crossfit": g.get("crossfit_writers")})
    if cfw is not None:  # the toxic neurons ranked as token writers (NeuronsConfig.writers): reported, not judged
        t = cfw["toxic_neurons"]
        m.ours += (f"; ranked as token writers: {t['count']} neurons carry {pct(t['share'])} {pct_interval(t['ci95'])} "
                   "(not judged: the share is of the reduction along the probe, and the writers' value vectors need "
                   "not point along it, so a small share is expected by construction)")
        if (r := t.get("random_sets")):
            m.ours += f", random sets of {r['count']} {pct(r['share'])} {pct_interval(r['ci95'])}"
    return m


def _toxic_share(cf: dict, text: str, prov: dict) -> Measured:
    """The cross-fitted toxic-neuron share of `cf` (a crossfit block of groups.json) as the claim's Measured."""
    t = cf["toxic_neurons"]
    ci = [c - 0.5 for c in t["ci95"]] if t["share"] is not None and all(map(finite, t["ci95"])) else None
    ours = (f"cross-fitted: {t['count']} toxic neurons chosen on {cf['split']['choose']} prompts carry "
            f"{pct(t['share'])} "
            f"{pct_interval(t['ci95'])} of the four groups' reduction on the other {cf['split']['measure']}"
            + (f"; {text}" if text else ""))
    if (r := t.get("random_sets")):
        ours += (f"; {r['n_sets']} random sets of {r['count']} neurons carry {pct(r['share'])} {pct_interval(r['ci95'])}, "
                 f"toxic − random {pct(r['toxic_minus_random']['diff'])} "
                 f"{pct_interval(r['toxic_minus_random']['ci95'])}")
    m = Measured(None if t["share"] is None else t["share"] - 0.5, ci, cf["split"]["measure"], ours,
                 f"cross-fitted share − 0.5 = {num(None if t['share'] is None else t['share'] - 0.5)} "
                 f"{interval(ci)}; {ours}", **prov)
    # against placebos by the toxic neurons' reduction minus half the four groups' ((share − 0.5) × their reduction):
    # a placebo's groups reduce ~0, so its share is a ratio of noise (Gemma study: placebo shares -0.51 [-0.71,
    # -0.47] from four-group reductions 2.8, 0.31, 0.55, -3.1, 0.39); groups.json before it: the share
    if "toxic_minus_half" in (cf.get("control") or {}):
        return _against_placebo(m, cf, "toxic_minus_half", 0.0,
                                "placebo column: the toxic neurons' reduction of the probe projection minus half the "
                                "four groups', i.e. (share − 0.5) × the groups' reduction, not the share")
    return _against_placebo(m, cf, "toxic_neurons", -0.5)


def reduction_spreads(ctx: StageContext) -> Measured:
    g = ctx.json("groups.json")
    shares = {k: stat_block(v, "share_of_positive") for k, v in g["groups"].items() if v.get("reduces_toxicity", k in GROUPS)}
    text = "in-sample: " + "; ".join(f"{k} {pct(v)} ({g['groups'][k]['count']} neurons)"
                                     for k, (v, _) in shares.items())
    prov = _prov(ctx, (g.get("fit") or {}).get("n_prompts"), g.get("fit"))
    cf, why = _crossfit(g)
    if cf is None:
        values = [v for v, _ in shares.values()]
        low = None if any(v is None for v in values) else min(values)
        return Measured(low, None, None, text, f"{why}; {text}", **prov)
    each = "; ".join(f"{k} {pct(v['share'])} {pct_interval(v['ci95'])} ({v['count']})" for k, v in cf["groups"].items())
    m = cf["min"]
    ci = m["ci95"] if m["share"] is not None and all(map(finite, m["ci95"])) else None
    ours = (f"cross-fitted (groups chosen on {cf['split']['choose']} prompts, measured on {cf['split']['measure']}): "
            f"{each}; smallest {m['group']} {pct(m['share'])}, interval of the minimum {pct_interval(ci)}")
    if cf.get("mlp") == "gated":
        ours = ("gated MLP: the sign of an activation is a convention, so the four groups are two sign-invariant "
                f"ones (TP−/AN−: a contribution toward the probe that fell; TN+/AP+: one away from it that grew); {ours}")
    # against placebos by the smallest group's reduction itself: a placebo's groups reduce ~0 on the measuring
    # half, so its shares are ratios of noise (intervals of ±100 on the SmolLM2 study); groups.json before it: share
    by_reduction = "min_reduction" in (cf.get("control") or {})
    m = Measured(m["share"], ci, cf["split"]["measure"], ours, f"{ours}; {text}", **prov)
    return _against_placebo(m, cf, "min_reduction" if by_reduction else "min", 0.0,
                            "placebo column: the smallest group's reduction of the probe projection, not its share"
                            if by_reduction else "")


def _against_placebo(m: Measured, cf: dict, stat: str, shift: float, what: str = "") -> Measured:
    """Attach groups.json's placebo block for `stat` (the claim's effect is the share + `shift`); `what` says what
    the placebo column measures where it is not the row's own statistic."""
    ctl = (cf.get("control") or {}).get(stat)
    if not ctl or ctl.get("diff") is None:
        return m
    ci = [x + shift for x in ctl["ci95"]] if ctl.get("ci95") else None
    m.against_placebo(ctl["mean"] + shift, ci, ctl["diff"], ctl["diff_ci95"], 3)
    if what:  # said where the row is read, whatever its verdict
        m.ours += f" ({what})"
    reds = cf["control"].get("four_groups_reduction") or []
    m.diagnosis += (f" ({cf['control']['draws']} placebos; their four groups' reduction on the measuring half: "
                    + ", ".join(num(x, 5) for x in reds) + (f"; {what}" if what else "") + ")")
    return m


def patching_replicates(ctx: StageContext) -> Measured:
    p = ctx.json("patching.json")
    base, aligned, patched = p["base"], p["aligned"], p["steps"][-1]
    prov = _prov(ctx, p.get("n_eval_prompts"))
    means = (f"base {num(base['toxicity']['mean'])} → patched {'+'.join(patched['groups'])} "
             f"{num(patched['toxicity']['mean'])} (aligned {num(aligned['toxicity']['mean'])}; patch {p.get('mode')})")
    try:
        tox = [per_prompt(r, "toxicity_per_prompt") for r in (base, aligned, patched)]
    except NoUnits:
        share = ratio(base["toxicity"]["mean"] - patched["toxicity"]["mean"],
                      base["toxicity"]["mean"] - aligned["toxicity"]["mean"])
        return more_than_half(share, None, base["toxicity"]["n"], means,
                              f"no per-prompt scores in neurons/patching.json: no paired interval; {means}", prov)
    # the share of the gap the patch closes, (base − patched)/(base − aligned), is 1 − the share it leaves
    share_left, ci_left, gap = gap_share(*tox, ctx)
    share = None if share_left is None else 1 - share_left
    ci = [1 - ci_left[1], 1 - ci_left[0]] if ci_left else None
    vs_aligned = paired_bootstrap(tox[1], tox[2], ctx.n_boot, ctx.seed)
    ppl = ppl_ratio(base, patched, ctx)
    ours = (f"{means}: {pct(share)} of the gap {pct_interval(ci)}; patched − aligned {num(vs_aligned['diff'])} "
            f"{interval(vs_aligned['ci95'])}; {ppl_text(ppl, base, patched)} vs base")
    vs_aligned_ppl = ppl_ratio(aligned, patched, ctx)  # "replicates DPO": at the aligned model's fluency
    ours += f"; {ppl_text(vs_aligned_ppl, aligned, patched)} vs aligned"
    diag = ours if ci is not None else (f"no toxicity gap to replicate: aligned − base {num(gap['diff'])} "
                                        f"{interval(gap['ci95'])}; {means}")
    null = (None, None)
    if (rnd := p.get("random")) and rnd.get("toxicity_per_prompt") and ci is not None:
        r = _vs_random(tox, rnd["toxicity_per_prompt"], ctx)
        text = (f"a random set of {rnd['n_neurons']} neurons with the groups' shift norm replicates {pct(r['random'])} "
                f"{pct_interval(r['random_ci95'])}, groups − random {pct(r['diff'])} {pct_interval(r['diff_ci95'])}")
        ours += f"; {text}"
        if not (r["diff_ci95"] and r["diff_ci95"][0] > 0):
            null = (f"the groups do not replicate more than the null: {text}", None)
    m = more_than_half(share, ci, gap["n"], ours, diag, prov)
    m = guarded(m, ppl_check(vs_aligned_ppl, aligned, patched), suffix=" (patched against aligned)")
    if m.guard is None and m.violation is None and null[0]:
        m.guard = null[0]
    return m


def _vs_random(tox: list, random_tox, ctx: StageContext) -> dict:
    """Shares of the base − aligned gap that the groups' patch and the random null's close, and their
    difference, paired over prompts (one bootstrap)."""
    b, a, g = (np.asarray(x, dtype=float) for x in tox)
    r = np.asarray(random_tox, dtype=float)
    idx = resample_units(len(b), ctx.n_boot, ctx.seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = (b - a)[idx].mean(1)
        sg, sr = (b - g)[idx].mean(1) / gap, (b - r)[idx].mean(1) / gap
        point = float(((b - r).mean()) / (b - a).mean()) if (b - a).mean() else None
        dpoint = float(((r - g).mean()) / (b - a).mean()) if (b - a).mean() else None
    return {"random": point, "random_ci95": percentile_ci(sr), "diff": dpoint, "diff_ci95": percentile_ci(sg - sr)}


CLAIMS = (
    Claim("toxic_neurons_small_share", "Yang", "dampening the toxic neurons is a small share of the reduction",
          PAPER["toxic_share"], -1,
          "effect = share of the four groups' reduction from the top toxic neurons that were active and dampened, "
          "minus 0.5 (less than half), both chosen on one half of the fit prompts and measured on the other; the "
          "in-sample shares of the positive and net reduction are reported; paper: < 0; against placebos by the "
          "toxic neurons' reduction minus half the four groups' ((share − 0.5) × their reduction: no ratio, ~0 "
          "for noise), aligned − placebo < 0",
          ("groups.json",), toxic_neurons_small_share, mechanism=True,
          requires=("vectors_toxic_tokens",)),
    Claim("reduction_spreads", "Yang", "the reduction spreads over the four neuron groups (TP−, TN+, AP+, AN−)",
          PAPER["groups"], +1,
          "effect = the smallest of the four groups' shares of their joint reduction, the groups chosen on one half "
          "of the fit prompts and measured on the other (bootstrap over that half, the minimum taken in each "
          "replicate); paper: > 0", ("groups.json",), reduction_spreads, mechanism=True),
    Claim("patching_replicates", "Yang", "patching the four groups' activations in the base model replicates DPO",
          PAPER["patching"], +1,
          "effect = (toxicity base − patched) / (base − aligned) − 0.5, paired over held-out prompts; paper: > 0 "
          f"(more than half of DPO's reduction; patched − aligned reported); holds only with the patched PPL within "
          f"×{PPL_BOUND} of the aligned model's (paired over windows)", ("patching.json",), patching_replicates),
)


def describe(r: NeuronsResult) -> str:
    """The CLI's summary: each group's share, the toxic neurons' share, the patching steps."""
    g = r["groups"]
    lines = [f"{name:<7} {v['count']:>6} neurons  {100 * (v['share_of_positive'] or 0):6.2f}% of positive"
             for name, v in g["groups"].items() if v.get("reduces_toxicity")]
    tn = g["toxic_neurons"]
    lines.append(f"toxic neurons: {100 * (tn['share_of_positive'] or 0):.2f}% of positive, "
                 f"{100 * (tn['share_of_net'] or 0):.2f}% of net")
    lines += [f"patch {'+'.join(s['groups']):<16} toxicity {s['toxicity']['mean']:.4f}  PPL {s['perplexity']}"
              for s in r["patching"]["steps"]]
    return "\n".join(lines)

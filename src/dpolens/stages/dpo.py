"""The dpo stage (paper 4, method.md 5.2): `dpolens.training` aligns the base with `method` (DPO by
default, in the paper's settings), then base and aligned are evaluated on the challenge prompts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from dpolens.artifacts import read_json, write_json, write_manifest
from dpolens.compare import WeightShiftSummary, weight_shift
from dpolens.drift import OVERUSE_FACTOR, drift
from dpolens.drift import reduction as relative_reduction
from dpolens.evaluate import evaluate_inputs, headline_rows, load_inputs, paired_bootstrap, percentile_ci
from dpolens.ledger import (
    PPL_BOUND,
    Claim,
    Measured,
    NoUnits,
    StageContext,
    identity,
    interval,
    num,
    pct,
    pct_interval,
    per_prompt,
    row_of,
    toxicity_drop,
    weights_moved,
)
from dpolens.model.loading import load_model
from dpolens.textquality import OVERUSE, WordShift, overuse_warning, overused_words
from dpolens.training import DPOSummary, DPOTraining, TrainConfig, strength_label, train_aligned
from dpolens.webpage import esc, image, table

log = logging.getLogger(__name__)


@dataclass
class DpoConfig(TrainConfig):
    evaluate: bool = True  # evaluate base and aligned on the challenge prompts after training (`eval`)
    # the paper's relative reduction (0.453 → 0.208 = 54%): training stops at the first checkpoint whose dev
    # prompts reach it (TrainConfig.target_reduction; None: train for the steps, keep the best validation loss)
    target_reduction: float | None = 0.54
    # with `evaluate`, how far every aligned model drifts from the base (drift.json): over-used words chosen on
    # half the prompts and measured on the other, distinct-2, per-token KL by position, cue-masked reduction
    drift: bool = True
    drift_kl_limit: int | None = 400  # prompts of the per-position KL profile (None: all)
    # prompts of the relevance measure (PMI of prompt and continuation, both models judging; None: all; 0: off)
    drift_relevance_limit: int | None = 100


class DPOResult(DPOSummary, total=False):
    """What `run_dpo` returns."""

    eval: list[dict[str, Any]]  # with `evaluate`: eval.json's rows (model, ref, weight_sha256, EvalResult.row())
    overused_words: list[WordShift]  # with `evaluate`: words in many more aligned continuations than base ones


class DPOHeadline(TypedDict, total=False):  # empty without summary.json
    training: DPOTraining
    weight_shift: WeightShiftSummary
    eval: list[dict[str, Any]] | None  # eval.json's rows without per-unit scores; None without eval.json
    models: dict[str, dict[str, Any] | None]  # base, aligned: LoadedModel.identity()
    strength: dict[str, Any] | None  # summary.json's strength block (dev toxicity per checkpoint), if any
    drift: list[dict[str, Any]] | None  # drift.json's per-model rows (reduction and each drift measure)


def strength_models(cfg: DpoConfig, summary: DPOSummary) -> list[tuple[str, str]]:
    """(label, folder) of the checkpoints kept at each strength, besides the analysed model ("aligned")."""
    st = summary.get("strength") or {}
    analysed = strength_label(cfg.target_reduction) if cfg.target_reduction is not None and \
        st.get("analysed_step") is not None else None
    return [(f"aligned@{label}%", path) for label, path in sorted((st.get("models") or {}).items(), key=lambda x: int(x[0]))
            if label != analysed]


def run_dpo(cfg: DpoConfig) -> DPOResult:
    inputs = load_inputs(cfg.eval) if cfg.evaluate else None  # read before training: a bad file fails now
    summary, base, aligned = train_aligned(cfg)
    out = Path(cfg.out)
    if inputs:
        rows, records = [], {}
        models = [("base", base), ("aligned", aligned)]
        models += [(label, load_model(path, dtype=cfg.dtype, device=cfg.device))
                   for label, path in strength_models(cfg, summary)]
        for label, m in models:
            res = evaluate_inputs(m, cfg.eval, inputs, label=label)
            rows.append({"model": label, "ref": m.ref, "weight_sha256": m.weight_hash, **res.row()})
            records[label] = res.records
        texts = [[r["continuation"] for r in records[k]] for k in ("base", "aligned")]
        shift = overused_words(*texts)
        warnings = [w] if (w := overuse_warning(shift)) else []
        for w in warnings:
            log.warning(w)
        write_json(out / "eval.json", {"rows": rows, "scorer": inputs.scorer.describe(),
                                       "n_prompts": len(inputs.prompts), "overused_words": shift,
                                       "warnings": warnings, "note": "challenge prompts are never used in "
                                       "training (pairs come from WikiText or tweet corpora)"})
        summary["eval"], summary["overused_words"] = rows, shift
        summary["warnings"] = [*summary.get("warnings", []), *warnings]
        if cfg.drift:
            st = cfg.eval.settings
            drifts = {label: drift(base, m, records["base"], records[label], inputs.scorer,
                                   max_prompt_tokens=st.max_prompt_tokens, kl_limit=cfg.drift_kl_limit, wiki=inputs.wiki,
                                   ppl_max_tokens=st.ppl_max_tokens, ppl_window=st.ppl_window, seed=cfg.seed,
                                   relevance_limit=cfg.drift_relevance_limit)
                      for label, m in models[1:]}
            from dpolens import figures

            dose = dose_rows(drifts, rows)
            # written before the figures are drawn: a figure that fails does not lose the measures
            block = {"models": drifts, "dose_response": dose, "seed": cfg.seed, "scorer": inputs.scorer.describe(),
                     "n_prompts": len(inputs.prompts)}
            write_json(out / "drift.json", block)
            figs = figures.kl_profile_figure(out, drifts) + (figures.dose_response_figure(out, dose) if len(dose) > 1
                                                             else [])
            write_json(out / "drift.json", {**block, "figures": figs})
        # each kept strength as a dpo folder of its own (its model as "aligned"): the ledger's dpo rows at that
        # strength, and the wiring of the stages a study repeats there (`dose_response`)
        for (label, m), path in zip(models[2:], (p for _, p in strength_models(cfg, summary))):
            folder = Path(path).parent
            row = {**row_of(rows, label), "model": "aligned"}
            write_json(folder / "eval.json", {"rows": [row_of(rows, "base"), row], "scorer": inputs.scorer.describe(),
                                              "n_prompts": len(inputs.prompts), "strength_of": str(out)})
            if cfg.drift:
                write_json(folder / "drift.json", {"models": {"aligned": drifts[label]}, "seed": cfg.seed,
                                                   "scorer": inputs.scorer.describe(), "n_prompts": len(inputs.prompts)})
            shift = weight_shift(base.model, m.model)
            write_json(folder / "summary.json", {"weight_shift": {k: v for k, v in shift.items() if k != "per_tensor"},
                                                 "base": base.identity(), "aligned": m.identity(),
                                                 **(read_json(folder / "strength.json") or {})})
    write_manifest(out, "dpo", cfg, base=base.identity(), aligned=aligned.identity())
    return summary


PAPER = {"dpo": "toxicity 0.453 → 0.208, PPL 21.7 → 23.34, F1 0.193 → 0.195",
         "weight_shift": "every parameter's cosine > 0.99; mean norm difference < 1e-5 (unembedding < 1e-3)"}


def headline(folder: Path) -> DPOHeadline:
    """Training, weight shift and the base vs aligned evaluation, for results.json."""
    if not (d := read_json(folder / "summary.json")):
        return {}
    ev = read_json(folder / "eval.json") or {}
    keys = ("steps", "pairs_seen", "best_val_loss", "reward_accuracy", "reward_margin")
    return {"training": {**{k: d.get(k) for k in keys},
                         "warnings": [*(d.get("warnings") or []), *ev.get("warnings", [])],
                         "overused_words": ev.get("overused_words")},
            "weight_shift": d.get("weight_shift"),
            "eval": headline_rows(ev.get("rows")),
            "models": {"base": d.get("base"), "aligned": d.get("aligned")},
            "strength": d.get("strength"),
            "drift": (read_json(folder / "drift.json") or {}).get("dose_response")}


def section(folder: Path, headline: DPOHeadline, manifest: dict) -> str:
    parts = []
    cfg = manifest.get("config") or {}
    if (d := headline.get("eval")):
        steps = (headline.get("training") or {}).get("steps")
        how = (f" after {steps} steps of {cfg.get('method', 'dpo')} at lr {cfg.get('learning_rate')}"
               if steps is not None else "")
        parts += ["<h2>DPO (paper 4)</h2>",
                  table(d, ["model", "toxicity", "perplexity", "f1", "repetition"],
                        f"Base vs aligned{how} on held-out challenge prompts. Paper: {PAPER['dpo']}.")]
        parts += [f"<p><b>Warning:</b> {esc(w)}</p>" for w in (headline.get("training") or {}).get("warnings") or []]
    if (st := headline.get("strength")):
        kept = st.get("kept") or {}
        reached = ", ".join(f"{k}% at step {v}" + (f" (kept step {kept[k]}, the nearer)" if kept.get(k, v) != v else "")
                            for k, v in (st.get("reached") or {}).items()) or "none"
        parts.append(table([{"step": r["step"], "dev toxicity": r["toxicity"], "reduction": r["reduction"]}
                            for r in st.get("trajectory") or []], ["step", "dev toxicity", "reduction"],
                           f"Strength control: greedy toxicity on {st['dev']['n']} dev prompts (never evaluation "
                           f"prompts: {st['dev']['n_from_files']} from {', '.join(Path(f).name for f in st['dev']['files']) or 'no file'}, "
                           f"{st['dev'].get('n_held_out_evaluation_prompts', 0)} held out of the evaluation prompts, "
                           f"{st['dev']['n_validation_pair_prompts']} validation pairs' prompts) at each checkpoint. "
                           f"Target {st.get('target_reduction')}; reached: {reached}; analysed step: "
                           f"{st.get('analysed_step')}."))
    if (dr := headline.get("drift")):
        cols = sorted({k for r in dr for k in r["measures"]})
        parts.append(table([{"model": r["model"], "reduction": f"{pct(r['reduction'])} {pct_interval(r['reduction_ci95'])}",
                             **{k: f"{num(v['value'])} {interval(v['ci95'])}" for k, v in r["measures"].items()}}
                            for r in dr], ["model", "reduction", *cols],
                           "Drift of each aligned model from the base on the evaluation prompts (95% intervals over "
                           "prompts): over-use excess = max share(aligned) − 2·share(base) of the markers chosen on "
                           "the other half of the prompts; KL per token teacher-forced on the aligned continuations; "
                           "cue-masked reduction = the reduction with the scorer's strongest single-word cues removed."))
        for name, cap in (("fig_kl_profile.png", "Per-token KL(aligned ‖ base) by generated position (Qi et al.'s "
                           "depth profile), 95% bands over prompts."),
                          ("fig_dose_response.png", "Each drift measure against the alignment's toxicity reduction, "
                           "one point per kept checkpoint.")):
            if (folder / name).exists():
                parts.append(image(folder / name, cap))
    if (w := headline.get("weight_shift")):
        parts.append(table([{k: w[k] for k in ("min_cosine", "mean_norm_diff", "all_above_0_99")}],
                           ["min_cosine", "mean_norm_diff", "all_above_0_99"],
                           f"How far DPO moved the weights. Paper: {PAPER['weight_shift']}."))
    return "".join(parts)


# ---- claims --------------------------------------------------------------------------------------

def dpo_lowers_toxicity(ctx: StageContext) -> Measured:
    ev = ctx.json("eval.json")
    base, aligned = row_of(ev["rows"], "base"), row_of(ev["rows"], "aligned")
    prov = dict(models={"base": identity(base), "aligned": identity(aligned)}, scorer=ev.get("scorer"),
                data={"n_prompts": ev.get("n_prompts")})
    d = (ctx.json("drift.json", required=False) or {}).get("models", {}).get("aligned")
    return toxicity_drop(base, aligned, ctx, prov, "dpo/eval.json", ev.get("overused_words"),
                         collapse=(d or {}).get("overuse", {}).get("worst"))


def reduction_of(folder: Path) -> float | None:
    """1 − toxicity(aligned) / toxicity(base) on the evaluation prompts of a dpo folder (or a kept strength's)."""
    rows = {r["model"]: r for r in (read_json(Path(folder) / "eval.json") or {}).get("rows") or []}
    b, a = rows.get("base"), rows.get("aligned")
    return 1 - a["toxicity"]["mean"] / b["toxicity"]["mean"] if b and a and b["toxicity"]["mean"] else None


def _eval_prov(ctx: StageContext) -> tuple[dict, dict, dict, dict]:
    ev = ctx.json("eval.json")
    base, aligned = row_of(ev["rows"], "base"), row_of(ev["rows"], "aligned")
    return ev, base, aligned, dict(models={"base": identity(base), "aligned": identity(aligned)},
                                   scorer=ev.get("scorer"), data={"n_prompts": ev.get("n_prompts")})


def strength_matches_paper(ctx: StageContext) -> Measured:
    """|reduction − the paper's| − tolerance, the reduction 1 − toxicity(aligned)/toxicity(base) paired over prompts."""
    ev, base, aligned, prov = _eval_prov(ctx)
    try:
        r = relative_reduction(per_prompt(base, "toxicity_per_prompt"), per_prompt(aligned, "toxicity_per_prompt"),
                               ctx.seed, ctx.n_boot)
    except NoUnits:
        point = 1 - aligned["toxicity"]["mean"] / base["toxicity"]["mean"]
        text = f"reduction {pct(point)}; no per-prompt scores in dpo/eval.json: no interval"
        return Measured(abs(point - PAPER_REDUCTION) - STRENGTH_TOLERANCE, None, None, text, text, **prov)
    effect = abs(r["mean"] - PAPER_REDUCTION) - STRENGTH_TOLERANCE
    ci = percentile_ci(abs(r["replicates"] - PAPER_REDUCTION) - STRENGTH_TOLERANCE)
    ours = (f"reduction {pct(r['mean'])} {pct_interval(r['ci95'])} of the base's toxicity "
            f"({num(base['toxicity']['mean'])} → {num(aligned['toxicity']['mean'])}); paper {pct(PAPER_REDUCTION)}")
    return Measured(effect, ci, r["n"], ours, ours, **prov)


def no_overuse(ctx: StageContext) -> Measured:
    ev, base, aligned, prov = _eval_prov(ctx)
    o = ctx.json("drift.json")["models"]["aligned"]["overuse"]
    if not (w := o.get("worst")):
        return Measured(None, None, o.get("measured_on"), "no marker rose", "no word or pattern rose", **prov)
    words = "; ".join(f"'{x['word']}' {pct(x['base_share'])} → {pct(x['aligned_share'])}" for x in o["words"][:4])
    ours = (f"'{w['word']}': aligned − {w['factor']:g}× base share {pct(w['excess'])} "
            f"{pct_interval(w['excess_ci95'])} (max over {len(o['words'])} markers chosen on {o['chosen_on']} prompts, "
            f"measured on {o['measured_on']}); {words}")
    return Measured(w["excess"], w["excess_ci95"], o["measured_on"], ours, ours,
                    **{**prov, "data": {**prov["data"], "split_seed": o.get("split_seed")}})


def reduction_beyond_cues(ctx: StageContext) -> Measured:
    ev, base, aligned, prov = _eval_prov(ctx)
    c = ctx.json("drift.json")["models"]["aligned"]["cue_sensitivity"]
    cues = ", ".join(x["word"] for x in c["cues"][:6]) or "none"
    r, m, k = c["reduction"], c["masked_reduction"], c["share_kept"]
    ours = (f"reduction {num(r['mean'])} {interval(r['ci95'])}; with the scorer's {c['n_cues']} strongest single-word "
            f"cues masked (toxicity ≥ {c['threshold']} alone: {cues}) {num(m['mean'])} {interval(m['ci95'])}, "
            f"{pct(k['mean'])} {pct_interval(k['ci95'])} of it kept")
    return Measured(m["mean"], m["ci95"], c["n"], ours, ours, **prov)


def dose_rows(drifts: dict[str, dict], rows: list[dict]) -> list[dict]:
    """Per aligned model: its reduction on the evaluation prompts and each drift measure with its interval."""
    base = row_of(rows, "base")
    out = []
    for label, d in drifts.items():
        t = paired_bootstrap(base["toxicity_per_prompt"], row_of(rows, label)["toxicity_per_prompt"])
        o, c, k = d["overuse"].get("worst") or {}, d["cue_sensitivity"], d["kl_challenge"]["mean_over_positions"]
        measures = {"Δ toxicity": {"value": t["diff"], "ci95": t["ci95"]},
                    "distinct-2 Δ": {"value": d["distinct_2"]["diff"], "ci95": d["distinct_2"]["diff_ci95"]},
                    "KL per token (challenge)": {"value": k["mean"], "ci95": k["ci95"]},
                    "cue-masked reduction": {"value": c["masked_reduction"]["mean"], "ci95": c["masked_reduction"]["ci95"]}}
        if o:
            measures["over-use excess"] = {"value": o["excess"], "ci95": o["excess_ci95"]}
        if r := (d.get("relevance") or {}).get("diff"):  # PMI of prompt and continuation, aligned − base
            measures["relevance Δ (PMI)"] = {"value": r["mean"], "ci95": r["ci95"]}
        out.append({"model": label, "reduction": d["reduction"]["mean"], "reduction_ci95": d["reduction"]["ci95"],
                    "measures": measures})
    return out


def weights_barely_move(ctx: StageContext) -> Measured:
    s = ctx.json("summary.json")
    return weights_moved(s["weight_shift"], {"base": identity(s.get("base")), "aligned": identity(s.get("aligned"))})


PAPER_REDUCTION = 1 - 0.208 / 0.453  # the paper's relative reduction (Table 2: 0.453 → 0.208)
STRENGTH_TOLERANCE = 0.10  # the analysed model's reduction within 10 points of the paper's


CLAIMS = (
    Claim("dpo_lowers_toxicity", "Lee", "DPO lowers toxicity at a small perplexity and F1 cost", PAPER["dpo"], -1,
          "effect = toxicity(aligned) − toxicity(base), paired over prompts; paper: < 0; holds only with the PPL "
          f"ratio (paired over windows) at most ×{PPL_BOUND}, no significant F1 drop (paired over rows) and no marker in "
          f"{OVERUSE:.0%} more of the aligned continuations than of the base's (a collapse onto one subject; chosen on "
          "half the prompts, measured on the other, by its interval)",
          ("eval.json",), dpo_lowers_toxicity),
    Claim("strength_matches_paper", "dpolens", "the analysed alignment is as strong as the paper's: it removes "
          f"{PAPER_REDUCTION:.0%} ± {STRENGTH_TOLERANCE:.0%} of the base's toxicity",
          f"toxicity 0.453 → 0.208: {PAPER_REDUCTION:.1%} removed", -1,
          f"effect = |reduction − {PAPER_REDUCTION:.3f}| − {STRENGTH_TOLERANCE}, reduction = 1 − toxicity(aligned)/"
          "toxicity(base) on the evaluation prompts, paired bootstrap over prompts; < 0: within the tolerance. A "
          "mechanism found at another strength may not be the paper's",
          ("eval.json",), strength_matches_paper),
    Claim("no_overuse", "dpolens", f"the aligned model continues its prompts: no word or pattern is in more than "
          f"{OVERUSE_FACTOR:g}× the base's share of its continuations",
          "the paper's aligned model continues its prompts (its Table 3)", -1,
          f"effect = max over markers of share(aligned) − {OVERUSE_FACTOR:g}·share(base); the markers (words, years, "
          "URLs, newlines) that rose most are chosen on one half of the prompts and measured on the other, the "
          "maximum taken inside each bootstrap replicate; < 0: no marker over-used",
          ("drift.json",), no_overuse),
    Claim("reduction_beyond_cues", "dpolens", "the toxicity reduction is not only dropped swear words: it remains "
          "with the scorer's strongest single-word cues masked",
          "not measured in the paper", +1,
          "effect = toxicity(base) − toxicity(aligned), paired over prompts, both re-scored with every word form the "
          "scorer alone rates ≥ 0.8 toxic removed; > 0: a reduction beyond those words",
          ("drift.json",), reduction_beyond_cues),
    Claim("weights_barely_move", "Lee", "every weight barely moves (cosine > 0.99)", PAPER["weight_shift"], +1,
          "effect = min over tensors of cos(base, aligned) − 0.99, deterministic (interval = the point); "
          "paper: > 0",
          ("summary.json",), weights_barely_move),
)


def describe(s: DPOResult) -> str:
    """The CLI's summary of a DPO run: training, weight shift, evaluation rows."""
    lines = [json.dumps({k: s[k] for k in ("steps", "pairs_seen", "best_val_loss", "reward_accuracy",
                                           "weight_shift")}, indent=2, default=str)]
    lines += [f"{r['model']:<8} toxicity {r['toxicity']['mean']:.4f} {r['toxicity']['ci95']}  PPL {r['perplexity']}  "
              f"F1 {r['f1']}" for r in s.get("eval", [])]
    return "\n".join(lines)

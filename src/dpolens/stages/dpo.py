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
from dpolens.compare import WeightShiftSummary
from dpolens.evaluate import evaluate_inputs, headline_rows, load_inputs
from dpolens.ledger import PPL_BOUND, Claim, Measured, StageContext, identity, row_of, toxicity_drop, weights_moved
from dpolens.textquality import OVERUSE, WordShift, overuse_warning, overused_words
from dpolens.training import DPOSummary, DPOTraining, TrainConfig, train_aligned
from dpolens.webpage import esc, table

log = logging.getLogger(__name__)


@dataclass
class DpoConfig(TrainConfig):
    evaluate: bool = True  # evaluate base and aligned on the challenge prompts after training (`eval`)


class DPOResult(DPOSummary, total=False):
    """What `run_dpo` returns."""

    eval: list[dict[str, Any]]  # with `evaluate`: eval.json's rows (model, ref, weight_sha256, EvalResult.row())
    overused_words: list[WordShift]  # with `evaluate`: words in many more aligned continuations than base ones


class DPOHeadline(TypedDict, total=False):  # empty without summary.json
    training: DPOTraining
    weight_shift: WeightShiftSummary
    eval: list[dict[str, Any]] | None  # eval.json's rows without per-unit scores; None without eval.json
    models: dict[str, dict[str, Any] | None]  # base, aligned: LoadedModel.identity()


def run_dpo(cfg: DpoConfig) -> DPOResult:
    inputs = load_inputs(cfg.eval) if cfg.evaluate else None  # read before training: a bad file fails now
    summary, base, aligned = train_aligned(cfg)
    out = Path(cfg.out)
    if inputs:
        rows, texts = [], []
        for label, m in (("base", base), ("aligned", aligned)):
            res = evaluate_inputs(m, cfg.eval, inputs, label=label)
            rows.append({"model": label, "ref": m.ref, "weight_sha256": m.weight_hash, **res.row()})
            texts.append([r["continuation"] for r in res.records])
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
            "models": {"base": d.get("base"), "aligned": d.get("aligned")}}


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
    return toxicity_drop(base, aligned, ctx, prov, "dpo/eval.json", ev.get("overused_words"))


def weights_barely_move(ctx: StageContext) -> Measured:
    s = ctx.json("summary.json")
    return weights_moved(s["weight_shift"], {"base": identity(s.get("base")), "aligned": identity(s.get("aligned"))})


CLAIMS = (
    Claim("dpo_lowers_toxicity", "Lee", "DPO lowers toxicity at a small perplexity and F1 cost", PAPER["dpo"], -1,
          "effect = toxicity(aligned) − toxicity(base), paired over prompts; paper: < 0; holds only with the PPL "
          f"ratio (paired over windows) at most ×{PPL_BOUND}, no significant F1 drop (paired over rows) and no word in "
          f"{OVERUSE:.0%} more of the aligned continuations than of the base's (a collapse onto one subject)",
          ("eval.json",), dpo_lowers_toxicity),
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

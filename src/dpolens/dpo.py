"""The dpo stage (paper 4, method.md 5.2): `dpolens.training` aligns the base with `method` (DPO by
default, in the paper's settings), then base and aligned are evaluated on the challenge prompts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, TypedDict

from dpolens.artifacts import read_json, write_json, write_manifest
from dpolens.compare import WeightShiftSummary
from dpolens.evaluate import evaluate_inputs, headline_rows, load_inputs
from dpolens.textquality import WordShift, overuse_warning, overused_words
from dpolens.training import DPOConfig, DPOSummary, DPOTraining, train_aligned
from dpolens.webpage import esc, table

log = logging.getLogger(__name__)


class DPOResult(DPOSummary, total=False):
    """What `run_dpo` returns."""

    eval: list[dict[str, Any]]  # with `evaluate`: eval.json's rows (model, ref, weight_sha256, EvalResult.row())
    overused_words: list[WordShift]  # with `evaluate`: words in many more aligned continuations than base ones


class DPOHeadline(TypedDict, total=False):  # empty without summary.json
    dpo: DPOTraining
    weight_shift: WeightShiftSummary
    dpo_eval: list[dict[str, Any]] | None  # eval.json's rows without per-unit scores; None without eval.json
    models: dict[str, dict[str, Any] | None]  # base, aligned: LoadedModel.identity()


def run_dpo(cfg: DPOConfig) -> DPOResult:
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


PAPER = {"dpo": "toxicity 0.453 → 0.208, PPL 21.70 → 23.34, F1 0.193 → 0.195",
         "weight_shift": "every cosine > 0.99; mean norm difference < 1e-5 (unembedding up to 1e-3)"}


def headline(folder: Path) -> DPOHeadline:
    """Training, weight shift and the base vs aligned evaluation, for results.json."""
    if not (d := read_json(folder / "summary.json")):
        return {}
    ev = read_json(folder / "eval.json") or {}
    keys = ("steps", "pairs_seen", "best_val_loss", "reward_accuracy", "reward_margin")
    return {"dpo": {**{k: d.get(k) for k in keys},
                    "warnings": [*(d.get("warnings") or []), *ev.get("warnings", [])],
                    "overused_words": ev.get("overused_words")},
            "weight_shift": d.get("weight_shift"),
            "dpo_eval": headline_rows(ev.get("rows")),
            "models": {"base": d.get("base"), "aligned": d.get("aligned")}}


def section(folder: Path, results: dict) -> str:
    parts = []
    if (d := results.get("dpo_eval")):
        parts += ["<h2>DPO (paper 4)</h2>",
                  table(d, ["model", "toxicity", "perplexity", "f1", "repetition"],
                        f"Base vs aligned on held-out challenge prompts. Paper: {PAPER['dpo']}.")]
        parts += [f"<p><b>Warning:</b> {esc(w)}</p>" for w in (results.get("dpo") or {}).get("warnings") or []]
    if (w := results.get("weight_shift")):
        parts.append(table([{k: w[k] for k in ("min_cosine", "mean_norm_diff", "all_above_0_99")}],
                           ["min_cosine", "mean_norm_diff", "all_above_0_99"],
                           f"How far DPO moved the weights. Paper: {PAPER['weight_shift']}."))
    return "".join(parts)


def describe(s: DPOResult) -> str:
    """The CLI's summary of a DPO run: training, weight shift, evaluation rows."""
    lines = [json.dumps({k: s[k] for k in ("steps", "pairs_seen", "best_val_loss", "reward_accuracy",
                                           "weight_shift")}, indent=2, default=str)]
    lines += [f"{r['model']:<8} toxicity {r['toxicity']['mean']:.4f} {r['toxicity']['ci95']}  PPL {r['perplexity']}  "
              f"F1 {r['f1']}" for r in s.get("eval", [])]
    return "\n".join(lines)

"""The seeds' claims as a ledger (`claims.json`): which findings of the papers hold on this run.

One row per claim of Lee et al. (ICML 2024), Yang et al. ("Beyond toxic neurons") and the review's
open questions, built from a run directory's artifacts only (no model is loaded; the run's
toxicity scorer is, to score Table 1's tokens). Each row holds the claim, the paper's figure, ours,
n, the effect with its 95% interval, the verdict, the rule behind it, a one-line diagnosis with
numbers for every row that does not hold, and the models, scorer, data and bootstrap seed.

Verdict (`verdict`, the one rule of every row): the paper's direction is the sign of the effect it
reports; `holds` iff the 95% interval excludes zero on that side, `contradicted` iff it excludes
zero on the other side, else `inconclusive`. A row without an interval is never `holds`. A
deterministic quantity (the weight cosines) has the point as its interval. Intervals are seeded
bootstraps (dpolens.evaluate) over the claim's units: prompts paired across models, perplexity
windows, validation examples, value vectors, or neurons where the artifact says so.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from dpolens.artifacts import DpolensError, read_json, write_json
from dpolens.evaluate import (MIN_PPL_WINDOWS, paired_bootstrap, paired_gap_share, paired_ppl_ratio,
                              percentile_ci, resample_units, unpaired_bootstrap)
from dpolens.textquality import OVERUSE

log = logging.getLogger(__name__)

VERDICTS = ("holds", "contradicted", "inconclusive")
RULE = ("holds iff the 95% interval of the effect excludes zero in the paper's direction; contradicted iff it "
        "excludes zero in the opposite direction; otherwise inconclusive. A row without an interval is never holds.")
TOP_VECTORS = 10  # Table 1 lists the top 10 value vectors
TRANSFORMED = ("rot13", "base64", "leetspeak", "spaced", "upper")
PPL_BOUND = 1.10  # "small / comparable perplexity": within ×1.10 (issue #15's bound for DPO)


def verdict(ci95, paper_sign: int) -> str:
    """The ledger's rule: `paper_sign` (+1 / −1) is the side of zero the paper's effect lies on."""
    if ci95 is None or len(ci95) != 2 or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in ci95):
        return "inconclusive"
    lo, hi = sorted(ci95)
    if (lo > 0 and paper_sign > 0) or (hi < 0 and paper_sign < 0):
        return "holds"
    if (lo > 0 and paper_sign < 0) or (hi < 0 and paper_sign > 0):
        return "contradicted"
    return "inconclusive"


class StageNotRun(Exception):
    """An artifact the claim needs is missing."""


@dataclass
class Context:
    """What the builders share: the run folder, the bootstrap settings, the scorer (made on demand)."""

    run: Path
    n_boot: int = 2000
    seed: int = 0
    scorer_factory: Callable | None = None
    _scorer: object = None

    def json(self, rel: str, required: bool = True):
        data = read_json(self.run / rel)
        if data is None and required:
            raise StageNotRun(rel)
        return data

    def manifest(self, stage: str) -> dict:
        return read_json(self.run / stage / "manifest.json") or {}

    def scorer(self):
        if self._scorer is None:
            from dpolens.scoring import get_scorer

            self._scorer = (self.scorer_factory or get_scorer)(self.scorer_name())
        return self._scorer

    def scorer_name(self) -> str:
        """The toxicity scorer the run's evaluations used (default: dpolens's default)."""
        for rel in ("table2/table.json", "dpo/eval.json", "unalign/table.json", "robustness/table.json"):
            if (d := read_json(self.run / rel)) and isinstance(d.get("scorer"), dict):
                return d["scorer"]["name"]
        for stage in ("table2", "dpo", "unalign", "neurons"):
            if (ev := self.manifest(stage).get("config", {}).get("eval")) and ev.get("scorer"):
                return ev["scorer"]
        from dpolens.scoring import DEFAULT_SCORER

        return DEFAULT_SCORER


@dataclass
class Measured:
    """What a builder found: the effect, its interval, and the words and provenance around them."""

    effect: float | None
    ci95: list[float] | None
    n: int | None
    ours: str
    diagnosis: str = ""  # the numbers behind a verdict other than `holds`
    models: dict = field(default_factory=dict)
    scorer: dict | str | None = None
    data: dict | None = None
    guard: str | None = None  # a cost the claim rules out (e.g. perplexity): blocks `holds`, says why


@dataclass(frozen=True)
class Claim:
    id: str
    source: str
    claim: str
    paper: str
    sign: int  # +1: the paper's effect is positive, −1: negative
    rule: str  # what the effect is and which side the paper's lies on
    artifacts: tuple[str, ...]
    build: Callable[[Context], Measured]


# ---- helpers -------------------------------------------------------------------------------------

def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:.2e}"


def _ci(ci, digits: int = 3) -> str:
    return f"[{_f(ci[0], digits)}, {_f(ci[1], digits)}]" if ci else "[no interval]"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _pct_ci(ci) -> str:
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "[no interval]"


def _identity(d: dict | None) -> dict | None:
    return {k: d.get(k) for k in ("ref", "weight_sha256")} if d else None


def _row(rows: list[dict], model: str) -> dict | None:
    return next((r for r in rows if r.get("model") == model), None)


class _NoUnits(Exception):
    """A row has no per-unit scores (an artifact from before per-prompt scores were kept)."""


def _per_prompt(row: dict, what: str) -> list[float]:
    """A row's per-unit scores (`toxicity_per_prompt`, `f1_per_row`): rows written before they
    existed have none, and then no paired interval can be had."""
    values = row.get(what)
    if not values:
        raise _NoUnits(what)
    return values


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _ppl_ratio(a: dict, b: dict, ctx: Context) -> dict | None:
    """PPL_b / PPL_a, paired over windows, when both rows kept their windows."""
    if not (a.get("ppl_window_nll") and b.get("ppl_window_nll")):
        return None
    return paired_ppl_ratio(a["ppl_window_nll"], a["ppl_window_tokens"], b["ppl_window_nll"], b["ppl_window_tokens"],
                            ctx.n_boot, ctx.seed)


def _ppl_text(r: dict | None, a: dict, b: dict) -> str:
    if r:
        ci = _ci(r["ci95"]) if r["ci95"] else f"(no interval: fewer than {MIN_PPL_WINDOWS} windows)"
        return f"PPL ×{_f(r['ratio'])} {ci} over {r['n']} window{'s' if r['n'] != 1 else ''}"
    if a.get("perplexity") and b.get("perplexity"):
        return f"PPL ×{_f(b['perplexity'] / a['perplexity'])} (no per-window NLL, no interval)"
    return "PPL not measured"


def _ppl_guard(r: dict | None, a: dict, b: dict, two_sided: bool = False) -> str | None:
    """Why the perplexity cost rules the claim out: the ratio's upper bound (its point without an
    interval) above PPL_BOUND, or (two_sided) below 1 / PPL_BOUND."""
    ratio = r["ratio"] if r else (b["perplexity"] / a["perplexity"] if a.get("perplexity") and b.get("perplexity")
                                  else None)
    if ratio is None:
        return None
    lo, hi = (r["ci95"] if r and r["ci95"] else (ratio, ratio))
    if hi > PPL_BOUND or (two_sided and lo < 1 / PPL_BOUND):
        return f"perplexity ×{_f(ratio)} is outside the stated bound ×{PPL_BOUND}: {_ppl_text(r, a, b)}"
    return None


def _gap_share(base, aligned, other, ctx: Context) -> tuple[float | None, list[float] | None, dict]:
    """evaluate.paired_gap_share as (share, ci95, gap)."""
    r = paired_gap_share(base, aligned, other, ctx.n_boot, ctx.seed)
    return r["share"], r["ci95"], r["gap"]


def _more_than_half(share: float | None, ci: list[float] | None, n: int | None, ours: str, diag: str,
                    prov: dict) -> Measured:
    """The paper says the gap is undone / replicated: the effect is the share of the gap minus one half
    (more than half of it, not merely a move in its direction)."""
    return Measured(None if share is None else share - 0.5, [c - 0.5 for c in ci] if ci else None, n, ours, diag,
                    **prov)


def _stat_block(block: dict | None, key: str) -> tuple[float | None, list[float] | None]:
    """(value, ci95) of `key` in a block, with its interval in the form the stages write:
    {key: {"mean", "ci95"}} (analysis) or {key, "ci95_" + key} (neurons)."""
    if not block:
        return None, None
    v = block.get(key)
    if isinstance(v, dict):
        return v.get("mean"), v.get("ci95")
    return v, block.get(f"ci95_{key}")


# ---- Lee et al. ---------------------------------------------------------------------------------

def _auroc(y: np.ndarray, p: np.ndarray) -> float:
    from scipy.stats import rankdata

    pos = y == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float((rankdata(p)[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def probe_separates(ctx: Context) -> Measured:
    m = ctx.json("probe/metrics.json")
    preds = ctx.json("probe/val_predictions.json", required=False)
    effect = m["accuracy"] - m["majority_baseline"]
    base = dict(models={"probe model": _identity(m.get("model"))},
                data={"corpora": list(m.get("data", {})), "n_val": m.get("n_val"), "seed": m.get("seed")})
    head = (f"validation accuracy {_f(m['accuracy'])} vs majority baseline {_f(m['majority_baseline'])}, "
            f"AUROC {_f(m['auroc'])}")
    if not preds:
        return Measured(effect, None, m.get("n_val"), head,
                        f"no per-example predictions (probe/val_predictions.json): no interval; {head}", **base)
    y, prob = np.asarray(preds["label"]), np.asarray(preds["prob"], dtype=np.float64)
    correct = ((prob >= preds.get("threshold", 0.5)).astype(int) == y).astype(np.float64)
    idx = resample_units(len(y), ctx.n_boot, ctx.seed)
    share_toxic = y[idx].mean(1)
    acc_minus_majority = correct[idx].mean(1) - np.maximum(share_toxic, 1 - share_toxic)
    auroc_ci = percentile_ci([_auroc(y[i], prob[i]) for i in idx])
    ci = percentile_ci(acc_minus_majority)
    ours = f"{head} {_ci(auroc_ci)}; accuracy − majority {_f(effect)} {_ci(ci)} on {len(y)} held-out texts"
    return Measured(effect, ci, len(y), ours, f"accuracy − majority {_f(effect)} {_ci(ci)}; AUROC {_f(m['auroc'])} "
                    f"{_ci(auroc_ci)}", **base)


def vectors_toxic_tokens(ctx: Context) -> Measured:
    top = ctx.json("vectors/toxic_vectors.json")[:TOP_VECTORS]
    summary = ctx.json("vectors/summary.json", required=False) or {}
    writers = ctx.json("vectors/token_writers.json", required=False)
    random = ctx.json("vectors/random_vectors.json", required=False)
    writer_text = ""
    if writers:
        ranks = [r["cosine_rank"] for r in writers["rows"][:TOP_VECTORS]]
        writer_text = (f"; the vectors that most promote the probe's own top tokens rank {ranks} by cosine "
                       f"(median of the top {len(writers['rows'])}: {writers['median_cosine_rank']:.0f})")
    models = {"model": _identity(summary.get("model"))}
    if not random:
        return Measured(None, None, len(top), "no random-vector baseline (vectors/random_vectors.json)",
                        "no random-vector baseline (vectors/random_vectors.json; re-run the vectors stage): "
                        "no interval" + writer_text, models)
    try:
        scorer = ctx.scorer()
    except DpolensError as e:
        return Measured(None, None, len(top), f"scorer {ctx.scorer_name()} unavailable",
                        f"scorer {ctx.scorer_name()} unavailable ({e})" + writer_text, models)
    texts_top = [[t.strip() or t for t in r["top_tokens"]] for r in top]
    texts_random = [[t.strip() or t for t in r["top_tokens"]] for r in random["rows"]]
    flat = [t for ts in texts_top + texts_random for t in ts]
    tox = iter(scorer.score(flat).toxicity.tolist())
    per_top = [float(np.mean([next(tox) for _ in ts])) for ts in texts_top]
    per_random = [float(np.mean([next(tox) for _ in ts])) for ts in texts_random]
    r = unpaired_bootstrap(per_random, per_top, ctx.n_boot, ctx.seed)
    ours = (f"mean toxicity of the top-{len(top)} cosine vectors' top tokens {_f(r['mean_b'])} vs "
            f"{_f(r['mean_a'])} for {len(per_random)} random value vectors (seed {random['seed']}): "
            f"{_f(r['diff'])} {_ci(r['ci95'])}")
    most = max(range(len(top)), key=lambda i: per_top[i])
    diag = (f"top-{len(top)} tokens {_f(r['mean_b'])} vs random {_f(r['mean_a'])}, {_f(r['diff'])} {_ci(r['ci95'])}; "
            f"most toxic: L{top[most]['layer']}.{top[most]['neuron']} ({', '.join(texts_top[most][:5])})"
            + writer_text)
    return Measured(r["diff"], r["ci95"], len(top), ours, diag, models, scorer.describe(),
                    {"random_vectors": random["n"], "random_seed": random["seed"], "tokens_per_vector":
                     len(texts_top[0]) if texts_top else 0})


TABLE2_PAPER = {"probe": "W_Toxic: toxicity 0.453 → 0.245 at PPL 21.7 → 23.56",
                "mlp.v": "MLP.v^19_770: toxicity 0.453 → 0.305 at PPL 21.7 → 23.30",
                "svd.u": "SVD.U_Toxic[0]: toxicity 0.453 → 0.268 at PPL 21.7 → 23.48"}


def table2_row(prefix: str) -> Callable[[Context], Measured]:
    """Subtracting the `prefix` vector vs subtracting a random vector, on the same prompts."""

    def build(ctx: Context) -> Measured:
        t2 = ctx.json("table2/table.json")
        rows = {r["vector"]: r for r in t2["rows"]}
        vec = next((r for label, r in rows.items() if label.startswith(prefix)), None)
        rand, noop = rows.get("random"), rows.get("none")
        if vec is None or rand is None:
            raise StageNotRun(f"table2/table.json rows '{prefix}' and 'random'")
        prov = dict(models={"model": _identity(t2.get("model"))}, scorer=t2.get("scorer"),
                    data={"n_prompts": t2.get("n_prompts"), "point": t2.get("point")})
        ppl = _ppl_ratio(rand, vec, ctx)
        context = (f"{vec['vector']} α={_f(vec['alpha'], 2)} ({_f(vec['alpha_rel'])} of ‖x‖): toxicity "
                   f"{_f(vec['toxicity']['mean'])} vs random {_f(rand['toxicity']['mean'])}"
                   + (f", no-op {_f(noop['toxicity']['mean'])}" if noop else ""))
        try:
            r = paired_bootstrap(_per_prompt(rand, "toxicity_per_prompt"), _per_prompt(vec, "toxicity_per_prompt"),
                                 ctx.n_boot, ctx.seed)
        except _NoUnits:
            diff = vec["toxicity"]["mean"] - rand["toxicity"]["mean"]
            return Measured(diff, None, vec["toxicity"]["n"], context, "no per-prompt scores in table2/table.json "
                            f"(re-run the stage): no paired interval; {context}", **prov)
        ours = f"{context}; Δ {_f(r['diff'])} {_ci(r['ci95'])}; {_ppl_text(ppl, rand, vec)} vs random"
        return Measured(r["diff"], r["ci95"], r["n"], ours, f"Δ vs random {_f(r['diff'])} {_ci(r['ci95'])}; "
                        f"{_ppl_text(ppl, rand, vec)}", guard=_ppl_guard(ppl, rand, vec, two_sided=True), **prov)

    return build


def dpo_lowers_toxicity(ctx: Context) -> Measured:
    ev = ctx.json("dpo/eval.json")
    base, aligned = _row(ev["rows"], "base"), _row(ev["rows"], "aligned")
    prov = dict(models={"base": _identity(base), "aligned": _identity(aligned)}, scorer=ev.get("scorer"),
                data={"n_prompts": ev.get("n_prompts")})
    return _toxicity_drop(base, aligned, ctx, prov, "dpo/eval.json", ev.get("overused_words"))


def _toxicity_drop(base: dict, aligned: dict, ctx: Context, prov: dict, where: str,
                   overused: list[dict] | None = None) -> Measured:
    """Toxicity aligned − base paired over prompts, guarded by the paired perplexity ratio and F1."""
    context = f"toxicity {_f(base['toxicity']['mean'])} → {_f(aligned['toxicity']['mean'])}"
    try:
        r = paired_bootstrap(_per_prompt(base, "toxicity_per_prompt"), _per_prompt(aligned, "toxicity_per_prompt"),
                             ctx.n_boot, ctx.seed)
    except _NoUnits:
        return Measured(aligned["toxicity"]["mean"] - base["toxicity"]["mean"], None, base["toxicity"]["n"], context,
                        f"no per-prompt scores in {where}: no paired interval; {context}", **prov)
    ppl = _ppl_ratio(base, aligned, ctx)
    f1 = (paired_bootstrap(base["f1_per_row"], aligned["f1_per_row"], ctx.n_boot, ctx.seed)
          if base.get("f1_per_row") and aligned.get("f1_per_row") else None)
    f1_text = (f"F1 {_f(f1['mean_a'])} → {_f(f1['mean_b'])}, Δ {_f(f1['diff'])} {_ci(f1['ci95'])}" if f1
               else "F1 not paired")
    cost = f"{_ppl_text(ppl, base, aligned)}; {f1_text}"
    if overused:
        w = overused[0]
        collapse = (f"'{w['word']}' in {_pct(w['aligned_share'])} of the aligned continuations "
                    f"(base {_pct(w['base_share'])})")
        cost += f"; most over-used word {collapse}"
    ours = f"{context}, Δ {_f(r['diff'])} {_ci(r['ci95'])}; {cost}"
    guard = _ppl_guard(ppl, base, aligned)
    if guard is None and f1 and f1["ci95"] and f1["ci95"][1] < 0:
        guard = f"F1 drops significantly: {f1_text}"
    if guard is None and overused and overused[0]["aligned_share"] - overused[0]["base_share"] >= OVERUSE:
        guard = f"the aligned model collapses onto one subject: {collapse}"
    return Measured(r["diff"], r["ci95"], r["n"], ours, f"Δ toxicity {_f(r['diff'])} {_ci(r['ci95'])}; {cost}",
                    guard=guard, **prov)


def weights_barely_move(ctx: Context) -> Measured:
    s = ctx.json("dpo/summary.json")
    return _weights(s["weight_shift"], {"base": _identity(s.get("base")), "aligned": _identity(s.get("aligned"))})


def _weights(w: dict, models: dict) -> Measured:
    """min cosine over tensors − 0.99 (compare.weight_shift's totals; `most_moved` where kept)."""
    effect = w["min_cosine"] - 0.99
    ours = (f"min cosine {w['min_cosine']:.7f} over {w.get('n_tensors')} tensors "
            f"({w.get('changed_tensors')} changed); mean ‖ΔW‖ {_f(w['mean_norm_diff'])}, "
            f"max {_f(w['max_norm_diff'])}")
    diag = f"min cosine {w['min_cosine']:.7f}"
    if moved := (w.get("most_moved") or [None])[0]:
        diag += (f"; most moved {moved.get('name')} (relative change {_f(moved.get('rel_diff'))}, "
                 f"cosine {_f(moved.get('cosine'), 6)})")
    return Measured(effect, [effect, effect], w.get("n_tensors"), ours, diag, models)


def _analysis_prov(a: dict) -> dict:
    return dict(models={"base": _identity(a.get("base")), "aligned": _identity(a.get("aligned"))},
                data={"n_prompts": a.get("n_prompts")})


def activation_drop(ctx: Context) -> Measured:
    a = ctx.json("analyze/analysis.json")
    d = a["activation_drop"]
    raw, signed = d.get("raw"), d.get("signed")
    sign_text = (f"the top {d.get('n_neurons')} toxic neurons' mean raw activation is "
                 f"{'negative' if d['mean_base'] < 0 else 'non-negative'} in the base ({_f(d['mean_base'], 5)})")
    raw_text = (f"raw activation {_f(raw['base'], 5)} → {_f(raw['aligned'], 5)}, Δ {_f(raw['diff'], 5)} "
                f"{_ci(raw['ci95'], 5)}" if raw else
                f"raw activation {_f(d['mean_base'], 5)} → {_f(d['mean_aligned'], 5)} (same tokens)")
    if not signed:
        return Measured(d["mean_aligned"] - d["mean_base"], None, a.get("n_prompts"), raw_text,
                        f"no per-prompt interval (analysis.json activation_drop.signed); {raw_text}; {sign_text}",
                        **_analysis_prov(a))
    signed_text = (f"contribution along the probe (m·cos(v, w)) {_f(signed['base'], 5)} → "
                   f"{_f(signed['aligned'], 5)}, Δ {_f(signed['diff'], 5)} {_ci(signed['ci95'], 5)}")
    return Measured(signed["diff"], signed["ci95"], signed["n"], f"{signed_text}; {raw_text}",
                    f"{signed_text}; {raw_text}; {sign_text}", **_analysis_prov(a))


def _offset_fallback(offset: list[dict]) -> float:
    layers = np.arange(len(offset)) - (len(offset) - 1) / 2
    rel = np.array([o["relative_norm"] for o in offset])
    return float(rel @ layers / (layers @ layers))


def offset_grows(ctx: Context) -> Measured:
    a = ctx.json("analyze/analysis.json")
    return _growth(a["offset"], a.get("offset_stats"), a.get("n_prompts"), _analysis_prov(a), "analysis.json")


def _growth(offset: list[dict], stats: dict | None, n_prompts: int | None, prov: dict, where: str) -> Measured:
    """Least-squares slope of ‖δx_l‖/‖x_l‖ over layers, with its interval over prompts where kept."""
    growth = (f"‖δx‖/‖x‖ {_f(offset[0]['relative_norm'], 4)} at layer 0 → "
              f"{_f(offset[-1]['relative_norm'], 4)} at layer {offset[-1]['layer']}")
    slope, ci = _stat_block(stats, "slope")
    if ci is None:
        return Measured(_offset_fallback(offset), None, n_prompts, growth,
                        f"no per-prompt interval ({where} offset_stats); {growth}", **prov)
    text = f"{growth}; slope per layer {_f(slope, 5)} {_ci(ci, 5)}"
    return Measured(slope, ci, stats["slope"].get("n"), text, text, **prov)


def offset_away_from_toxic(ctx: Context) -> Measured:
    a = ctx.json("analyze/analysis.json")
    last = a["offset"][-1]
    cos, ci = _stat_block(a.get("offset_stats"), "final_cosine_with_probe")
    if ci is None:
        text = f"cos(δx, probe) at layer {last['layer']}: {_f(last['cosine_with_probe'])}"
        return Measured(last["cosine_with_probe"], None, a.get("n_prompts"), text,
                        f"no per-prompt interval (analysis.json offset_stats); {text}", **_analysis_prov(a))
    text = f"cos(δx, probe) at layer {last['layer']}: {_f(cos)} {_ci(ci)}"
    return Measured(cos, ci, a["offset_stats"]["final_cosine_with_probe"].get("n"), text, text, **_analysis_prov(a))


def value_shifts_opposite(ctx: Context) -> Measured:
    a = ctx.json("analyze/analysis.json")
    stats = a.get("value_shift_stats")
    share, ci = _stat_block(stats, "share_anti_aligned")
    if ci is None or share is None:
        shares = {l: v.get("share_negative") for l, v in (a.get("value_shift_vs_offset") or {}).items()}
        text = "share of value-vector shifts anti-aligned with δx: " + (
            ", ".join(f"layer {l}: {_pct(s)}" for l, s in shares.items()) or "not measured")
        last = next(reversed(shares.values()), None) if shares else None
        return Measured(None if last is None else last - 0.5, None, None, text,
                        f"no interval (analysis.json value_shift_stats); {text}", **_analysis_prov(a))
    text = (f"{_pct(share)} {_pct_ci(ci)} of the shifted value vectors before layer "
            f"{stats.get('offset_layer')} point against δx there")
    return Measured(share - 0.5, [c - 0.5 for c in ci], stats["share_anti_aligned"].get("n"), text,
                    f"share anti-aligned − 0.5 = {_f(share - 0.5)} {_ci([c - 0.5 for c in ci])}; {text}",
                    **_analysis_prov(a))


def value_shifts_contribute(ctx: Context) -> Measured:
    a = ctx.json("analyze/analysis.json")
    stats = a.get("value_shift_stats")
    contrib, ci = _stat_block(stats, "contribution_along_offset")
    if ci is None or contrib is None:
        return Measured(None, None, None, "not measured",
                        "no interval (analysis.json value_shift_stats.contribution_along_offset)",
                        **_analysis_prov(a))
    text = (f"Σ m̄·Δv·δx̂ over the anti-aligned shifts {_f(contrib, 5)} {_ci(ci, 5)} "
            f"({stats['contribution_along_offset'].get('n')} neurons)")
    return Measured(contrib, ci, stats["contribution_along_offset"].get("n"), text, text, **_analysis_prov(a))


def unalign_restores(ctx: Context) -> Measured:
    u = ctx.json("unalign/table.json")
    rows = u["rows"]
    base, aligned, unaligned = _row(rows, "base"), _row(rows, "aligned"), _row(rows, "unaligned")
    if not (base and aligned and unaligned):
        raise StageNotRun("unalign/table.json rows base, aligned, unaligned")
    sign_aware = _row(rows, "unaligned-sign-aware")
    prov = dict(models={m: _identity(r) for m, r in (("base", base), ("aligned", aligned), ("unaligned", unaligned),
                                                     ("unaligned-sign-aware", sign_aware)) if r},
                scorer=u.get("scorer"), data={"n_prompts": u.get("n_prompts"), "k": u.get("k"),
                                              "scale": u.get("scale"), "rank": u.get("rank")})
    means = (f"base {_f(base['toxicity']['mean'])}, aligned {_f(aligned['toxicity']['mean'])}, "
             f"un-aligned {_f(unaligned['toxicity']['mean'])}"
             + (f", sign-aware {_f(sign_aware['toxicity']['mean'])}" if sign_aware else ""))
    try:
        tox = [_per_prompt(r, "toxicity_per_prompt") for r in (base, aligned, unaligned)]
    except _NoUnits:
        share = _ratio(unaligned["toxicity"]["mean"] - aligned["toxicity"]["mean"],
                       base["toxicity"]["mean"] - aligned["toxicity"]["mean"])
        return _more_than_half(share, None, base["toxicity"]["n"], means,
                               f"no per-prompt scores in unalign/table.json: no paired interval; {means}", prov)
    share, ci, gap = _gap_share(*tox, ctx)
    ppl = _ppl_ratio(aligned, unaligned, ctx)
    ours = f"{means}: {_pct(share)} of the gap back {_pct_ci(ci)}; {_ppl_text(ppl, aligned, unaligned)} vs aligned"
    if sign_aware and sign_aware.get("toxicity_per_prompt"):
        sa_share, sa_ci, _ = _gap_share(tox[0], tox[1], sign_aware["toxicity_per_prompt"], ctx)
        ours += f"; sign-aware variant {_pct(sa_share)} {_pct_ci(sa_ci)}"
    if (flip := u.get("sign_flip")) and flip.get("share") is not None:
        ours += f"; the scaled neurons write −v on {_pct(flip['share'])} of {flip.get('n_tokens')} prompt tokens"
    diag = ours if ci is not None else (f"no toxicity gap to recover: aligned − base {_f(gap['diff'])} "
                                        f"{_ci(gap['ci95'])}; {means}")
    return _more_than_half(share, ci, gap["n"], ours, diag, prov)


# ---- Yang et al. ----------------------------------------------------------------------------------

def _neurons_prov(ctx: Context, n_prompts=None, fit: dict | None = None) -> dict:
    """The neurons stage's models, scorer and data: the fit prompts (`fit`, groups.json's) or the evaluation's."""
    man = ctx.manifest("neurons")
    ev = man.get("config", {}).get("eval", {})
    prompts = (fit or {}).get("prompts") or ev.get("prompts")
    return dict(models={"base": _identity(man.get("base")), "aligned": _identity(man.get("aligned"))},
                scorer=ev.get("scorer"), data={"prompts": prompts, "n_prompts": n_prompts})


def toxic_neurons_small_share(ctx: Context) -> Measured:
    g = ctx.json("neurons/groups.json")
    tn = g["toxic_neurons"]
    pos, pos_ci = _stat_block(tn, "share_of_positive")
    net, net_ci = _stat_block(tn, "share_of_net")
    text = (f"{tn['count']} of the top {tn.get('top_n')} toxic neurons active and dampened: {_pct(pos)} "
            f"{_pct_ci(pos_ci)} of the positive reduction, {_pct(net)} {_pct_ci(net_ci)} of the net")
    prov = _neurons_prov(ctx, (g.get("fit") or {}).get("n_prompts"), g.get("fit"))
    if pos is None:
        return Measured(None, None, None, text, f"no positive reduction to share (neurons/groups.json); {text}",
                        **prov)
    ci = [c - 0.5 for c in pos_ci] if pos_ci else None
    diag = f"share of the positive reduction − 0.5 = {_f(pos - 0.5)} {_ci(ci)}; {text}"
    if ci is None:
        diag = f"no interval over prompts for the share (neurons/groups.json); {text}"
    return Measured(pos - 0.5, ci, (g.get("fit") or {}).get("n_prompts"), text, diag, **prov)


def reduction_spreads(ctx: Context) -> Measured:
    from dpolens.compare import GROUPS

    g = ctx.json("neurons/groups.json")
    shares = {k: _stat_block(g["groups"][k], "share_of_positive") for k in GROUPS}
    text = "; ".join(f"{k} {_pct(v)} ({g['groups'][k]['count']} neurons)" for k, (v, _) in shares.items())
    prov = _neurons_prov(ctx, (g.get("fit") or {}).get("n_prompts"), g.get("fit"))
    values = [v for v, _ in shares.values()]
    if any(v is None for v in values):
        return Measured(None, None, None, text, f"no positive reduction to share; {text}", **prov)
    smallest = min(shares, key=lambda k: shares[k][0])
    cis = [ci for _, ci in shares.values()]
    ci = [min(c[0] for c in cis), min(c[1] for c in cis)] if all(cis) else None
    ours = f"shares of the positive reduction: {text}; smallest {smallest}"
    diag = (f"smallest group share {smallest} {_pct(shares[smallest][0])}, interval of the minimum "
            f"{_pct_ci(ci)}; {text}" if ci else
            f"no interval over prompts for the group shares (neurons/groups.json); {text}")
    return Measured(shares[smallest][0], ci, (g.get("fit") or {}).get("n_prompts"), ours, diag, **prov)


def patching_replicates(ctx: Context) -> Measured:
    p = ctx.json("neurons/patching.json")
    base, aligned, patched = p["base"], p["aligned"], p["steps"][-1]
    prov = _neurons_prov(ctx, p.get("n_eval_prompts"))
    means = (f"base {_f(base['toxicity']['mean'])} → patched {'+'.join(patched['groups'])} "
             f"{_f(patched['toxicity']['mean'])} (aligned {_f(aligned['toxicity']['mean'])}; patch {p.get('mode')})")
    try:
        tox = [_per_prompt(r, "toxicity_per_prompt") for r in (base, aligned, patched)]
    except _NoUnits:
        share = _ratio(base["toxicity"]["mean"] - patched["toxicity"]["mean"],
                       base["toxicity"]["mean"] - aligned["toxicity"]["mean"])
        return _more_than_half(share, None, base["toxicity"]["n"], means,
                               f"no per-prompt scores in neurons/patching.json: no paired interval; {means}", prov)
    # the share of the gap the patch closes, (base − patched)/(base − aligned), is 1 − the share it leaves
    share_left, ci_left, gap = _gap_share(*tox, ctx)
    share = None if share_left is None else 1 - share_left
    ci = [1 - ci_left[1], 1 - ci_left[0]] if ci_left else None
    vs_aligned = paired_bootstrap(tox[1], tox[2], ctx.n_boot, ctx.seed)
    ppl = _ppl_ratio(base, patched, ctx)
    ours = (f"{means}: {_pct(share)} of the gap {_pct_ci(ci)}; patched − aligned {_f(vs_aligned['diff'])} "
            f"{_ci(vs_aligned['ci95'])}; {_ppl_text(ppl, base, patched)} vs base")
    vs_aligned_ppl = _ppl_ratio(aligned, patched, ctx)  # "replicates DPO": at the aligned model's fluency
    ours += f"; {_ppl_text(vs_aligned_ppl, aligned, patched)} vs aligned"
    diag = ours if ci is not None else (f"no toxicity gap to replicate: aligned − base {_f(gap['diff'])} "
                                        f"{_ci(gap['ci95'])}; {means}")
    m = _more_than_half(share, ci, gap["n"], ours, diag, prov)
    if guard := _ppl_guard(vs_aligned_ppl, aligned, patched):
        m.guard = f"{guard} (patched against aligned)"
    return m


# ---- the review ----------------------------------------------------------------------------------

def _retention(ctx: Context, transforms: tuple[str, ...]) -> Measured:
    """1 − retention of the offset under `transforms` (pooled: the mean of each transform's
    token-weighted retention), with one bootstrap over the shared prompts."""
    rb = ctx.json("robustness/table.json")
    rows = [r for r in rb["rows"] if r["model"] == "aligned" and r["transform"] in transforms]
    man = ctx.manifest("robustness")
    prov = dict(models={"base": _identity(man.get("base")), "aligned": _identity(man.get("aligned"))},
                scorer=rb.get("scorer"), data={"prompts": man.get("config", {}).get("prompts"),
                                               "n_prompts": rb.get("n_prompts"),
                                               "transforms": [r["transform"] for r in rows]})
    if not rows:
        raise StageNotRun(f"robustness/table.json rows for {', '.join(transforms)}")
    return _weakening(rows, rb.get("n_prompts"), prov, ctx, "robustness/table.json")


def _weakening(rows: list[dict], n_prompts: int | None, prov: dict, ctx: Context, where: str) -> Measured:
    """1 − the mean over `rows` (one per transform) of the token-weighted retention, bootstrapped
    over the prompts they share."""
    each = "; ".join(f"{r['transform']} {_f(r.get('retention_mean', float(np.mean(r['retention']))))}"
                     f"{' ' + _ci(r['retention_ci95']) if r.get('retention_ci95') else ''}" for r in rows)
    point = 1 - float(np.mean([r.get("retention_mean", np.mean(r["retention"])) for r in rows]))
    if not all(r.get("retention_per_prompt") for r in rows):
        return Measured(point, None, n_prompts, f"retention {each}",
                        f"no per-prompt retention ({where}): no interval; retention {each}", **prov)
    idx = resample_units(len(rows[0]["retention_per_prompt"]), ctx.n_boot, ctx.seed)
    weakening = []
    for r in rows:
        tokens = np.asarray(r["tokens_per_prompt"], dtype=np.float64)
        num = np.asarray(r["retention_per_prompt"], dtype=np.float64) * tokens
        weakening.append(1 - num[idx].sum(1) / tokens[idx].sum(1))
    ci = percentile_ci(np.mean(weakening, axis=0))
    ours = f"1 − retention {_f(point)} {_ci(ci)}; retention {each}"
    return Measured(point, ci, len(rows[0]["retention_per_prompt"]), ours, ours, **prov)


CLAIMS: tuple[Claim, ...] = (
    Claim("probe_separates", "Lee", "a linear probe separates toxic from non-toxic text",
          "94% validation accuracy (Jigsaw, gpt2-medium; majority baseline ~90%)", +1,
          "effect = accuracy − majority-class baseline on the held-out split (bootstrap over examples); paper: > 0",
          ("probe/metrics.json", "probe/val_predictions.json"), probe_separates),
    Claim("vectors_toxic_tokens", "Lee", "the value vectors most cosine-similar to the probe project to toxic tokens",
          "Table 1: MLP.v^19_770 → sh*t, a**, cr*p, f*ck, c*nt, garbage, trash (and 6 more toxic vectors)", +1,
          f"effect = mean toxicity (run's scorer) of the top-{TOP_VECTORS} vectors' top tokens − that of random "
          "value vectors (bootstrap over vectors); paper: > 0",
          ("vectors/toxic_vectors.json", "vectors/random_vectors.json"), vectors_toxic_tokens),
    *(Claim(f"subtract_{key.replace('.', '_')}_beats_random", "Lee",
            f"subtracting {label} from the last residual lowers toxicity more than a random direction, at "
            "comparable perplexity",
            TABLE2_PAPER[key] + " (no-op 0.453; the paper has no random control)", -1,
            f"effect = toxicity({label}) − toxicity(random), paired over prompts, each vector's α calibrated to "
            f"the same perplexity; paper: < 0; holds only with the PPL ratio within ×{PPL_BOUND} either way",
            ("table2/table.json",), table2_row(key))
      for key, label in (("probe", "the probe"), ("mlp.v", "the top MLP.v"), ("svd.u", "SVD.U[0]"))),
    Claim("dpo_lowers_toxicity", "Lee", "DPO lowers toxicity at a small perplexity and F1 cost",
          "toxicity 0.453 → 0.208, PPL 21.7 → 23.34, F1 0.193 → 0.195", -1,
          "effect = toxicity(aligned) − toxicity(base), paired over prompts; paper: < 0; holds only with the PPL "
          f"ratio (paired over windows) at most ×{PPL_BOUND}, no significant F1 drop (paired over rows) and no word in "
          f"{OVERUSE:.0%} more of the aligned continuations than of the base's (a collapse onto one subject)",
          ("dpo/eval.json",), dpo_lowers_toxicity),
    Claim("weights_barely_move", "Lee", "every weight barely moves (cosine > 0.99)",
          "every parameter's cosine > 0.99; mean norm difference < 1e-5 (unembedding < 1e-3)", +1,
          "effect = min over tensors of cos(base, aligned) − 0.99, deterministic (interval = the point); "
          "paper: > 0",
          ("dpo/summary.json",), weights_barely_move),
    Claim("toxic_neurons_activation_drop", "Lee", "the toxic neurons' activations drop after DPO",
          "Figure 2: mean activations of the top MLP.v_Toxic drop after DPO", -1,
          "effect = signed contribution along the probe, m·cos(v, probe), aligned − base on the same tokens, "
          "paired over prompts (the raw activation m is reported too); paper: < 0",
          ("analyze/analysis.json",), activation_drop),
    Claim("offset_grows", "Lee", "the residual offset δx grows over layers",
          "Figures 3-4: DPO's collective small weight changes accumulate into an offset δx across layers", +1,
          "effect = least-squares slope of ‖δx_l‖/‖x_l‖ over layers (bootstrap over prompts); paper: > 0",
          ("analyze/analysis.json",), offset_grows),
    Claim("offset_away_from_toxic", "Lee", "the offset moves the residual away from the toxic direction",
          "Figure 4: δx takes the residual out of the toxic keys' activation regions", -1,
          "effect = cos(δx at the last layer, probe) (bootstrap over prompts); paper: < 0",
          ("analyze/analysis.json",), offset_away_from_toxic),
    Claim("value_shifts_opposite", "Lee", "value-vector shifts point opposite to the offset",
          "Figure 5: approaching layer 19, most value vectors shift against δx^19", +1,
          "effect = share of shifted value vectors with cos(Δv, δx) < 0, minus 0.5 (bootstrap over neurons); "
          "paper: > 0", ("analyze/analysis.json",), value_shifts_opposite),
    Claim("value_shifts_contribute", "Lee",
          "the anti-aligned value shifts still add to the offset, through negative activations",
          "Figure 5: shifted value vectors contribute to δx because their activations are negative", +1,
          "effect = Σ over anti-aligned shifts of mean activation × Δv·δx̂ (bootstrap over neurons); "
          "paper: > 0",
          ("analyze/analysis.json",), value_shifts_contribute),
    Claim("unalign_restores", "Lee", "scaling the keys of the 7 most toxic value vectors ×10 undoes the alignment",
          "toxicity 0.208 → 0.458 (base 0.453), PPL 23.34 → 23.30: ~102% of the gap back", +1,
          "effect = (toxicity un-aligned − aligned) / (base − aligned) − 0.5, paired over prompts (no interval "
          "when the base−aligned gap is not significant); paper: > 0 (more than half the gap back). The verdict uses the paper's key scaling; the "
          "sign-aware variant is reported beside it", ("unalign/table.json",), unalign_restores),
    Claim("toxic_neurons_small_share", "Yang", "dampening the toxic neurons is a small share of the reduction",
          "4.9% of the positive reduction (2.333 / 47.96); 32% of the net (7.22)", -1,
          "effect = share of the positive reduction from the top toxic neurons that were active and dampened, "
          "minus 0.5 (less than half); the share of the net is reported; paper: < 0",
          ("neurons/groups.json",), toxic_neurons_small_share),
    Claim("reduction_spreads", "Yang", "the reduction spreads over the four neuron groups (TP−, TN+, AP+, AN−)",
          "four groups, two reducing toxicity and two promoting anti-toxicity, together 95.1% of the reduction", +1,
          "effect = the smallest of the four groups' shares of the positive reduction (interval: the minimum of the "
          "groups' bounds); paper: > 0", ("neurons/groups.json",), reduction_spreads),
    Claim("patching_replicates", "Yang", "patching the four groups' activations in the base model replicates DPO",
          "patching all four groups replicates DPO's toxicity reduction", +1,
          "effect = (toxicity base − patched) / (base − aligned) − 0.5, paired over held-out prompts; paper: > 0 "
          f"(more than half of DPO's reduction; patched − aligned reported); holds only with the patched PPL within "
          f"×{PPL_BOUND} of the aligned model's (paired over windows)", ("neurons/patching.json",),
          patching_replicates),
    Claim("transforms_weaken_offset", "review", "transformed prompts (ROT13, Base64, leetspeak, spaced, upper case) "
          "weaken the offset", "open question: encodings may bypass δx (not tested in the paper)", +1,
          "effect = 1 − retention of δx by the aligned model, mean over the transforms (bootstrap over prompts); "
          "conjecture: > 0", ("robustness/table.json",), lambda ctx: _retention(ctx, TRANSFORMED)),
    Claim("multi_turn_weakens_offset", "review", "multi-turn context weakens the offset",
          "open question: accumulated turns may drift the residual past δx (not tested in the paper)", +1,
          "effect = 1 − retention of δx by the aligned model under multi-turn context (bootstrap over prompts); "
          "conjecture: > 0", ("robustness/table.json",), lambda ctx: _retention(ctx, ("multi_turn",))),
)


def decide(c: Claim, ctx: Context) -> dict:
    """One ledger row: the claim measured on the run, or `inconclusive` when its stage did not run."""
    try:
        m = c.build(ctx)
    except StageNotRun as e:
        m = Measured(None, None, None, "stage not run", f"stage not run (missing {e})")
    finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)
    degenerate = m.ci95 is not None and not all(finite(x) for x in m.ci95)  # e.g. every resample 0/0
    ci95 = None if degenerate else m.ci95
    v = verdict(ci95, c.sign)
    diagnosis = None
    if v == "holds" and m.guard:
        v, diagnosis = "inconclusive", f"the effect holds, but {m.guard}"
    elif v != "holds":
        why = ("interval excludes zero opposite to the paper: " if v == "contradicted" else
               "no finite interval: " if degenerate else
               "" if ci95 is None else "interval includes zero: ")  # without one, the builder says why
        diagnosis = why + m.diagnosis
    return {"id": c.id, "claim": c.claim, "source": c.source, "paper": c.paper, "ours": m.ours, "n": m.n,
            "effect": m.effect if finite(m.effect) else None, "ci95": ci95, "verdict": v, "rule": c.rule,
            "diagnosis": diagnosis, "paper_direction": "> 0" if c.sign > 0 else "< 0", "models": m.models,
            "scorer": m.scorer, "data": m.data, "seed": ctx.seed, "n_boot": ctx.n_boot,
            "artifacts": list(c.artifacts)}


# ---- per alignment method (issue #18: the `alternatives` stage) ----------------------------------

def method_rows(ctx: Context) -> list[dict]:
    """The claims that `alternatives` measures again for each variant it compares (alignment methods
    or trainable-parameter variants): toxicity cut at small cost, weights barely move, the offset
    grows with depth, transforms and multi-turn context weaken it. Each row is the DPO claim's row,
    decided by the same rule, with `variant` and `method` added."""
    alt = ctx.json("alternatives/alternatives.json", required=False)
    if not alt or len(alt.get("rows", [])) < 2:
        return []
    base, by_id, out = alt["rows"][0], {c.id: c for c in CLAIMS}, []
    where = "alternatives/alternatives.json"
    for r in alt["rows"][1:]:
        label = r["variant"]
        prov = dict(models={"base": _identity(base), label: _identity(r)}, scorer=alt.get("scorer"),
                    data={"n_prompts": alt.get("n_prompts"), "n_offset_prompts": alt.get("n_offset_prompts")})
        retention = [{"transform": t, **v} for t, v in (r.get("retention") or {}).items()]

        def weakening(transforms, prov=prov, retention=retention):
            rows = [x for x in retention if x["transform"] in transforms]
            if not rows:
                raise StageNotRun(f"{where} retention for {', '.join(transforms)}")
            return _weakening(rows, alt.get("n_offset_prompts"), prov, ctx, where)

        builds = {
            "dpo_lowers_toxicity": lambda r=r, prov=prov: _toxicity_drop(base, r, ctx, prov, where,
                                                                         r.get("overused_words")),
            "weights_barely_move": lambda r=r, prov=prov: _weights(r["weight_shift"], prov["models"]),
            "offset_grows": lambda r=r, prov=prov: _growth(r["offset"], r.get("offset_stats"),
                                                           alt.get("n_offset_prompts"), prov, where),
            "transforms_weaken_offset": lambda w=weakening: w(TRANSFORMED),
            "multi_turn_weakens_offset": lambda w=weakening: w(("multi_turn",)),
        }
        for cid, build in builds.items():
            c = by_id[cid]
            claim = c.claim.removeprefix("DPO ") if cid == "dpo_lowers_toxicity" else c.claim
            row = decide(replace(c, id=f"{label}:{cid}", claim=f"{label}: {claim}", paper=f"DPO: {c.paper}",
                                 artifacts=(where,), build=lambda _ctx, b=build: b()), ctx)
            out.append({**row, "variant": label, "method": r.get("method")})
    return out


def build_claims(run_dir: str | Path, n_boot: int = 2000, seed: int = 0,
                 scorer_factory: Callable | None = None) -> dict:
    """The ledger of a run directory: every claim's row, the rule, and the count per verdict."""
    run = Path(run_dir)
    if not run.is_dir():
        raise DpolensError(f"run directory not found: {run}")
    ctx = Context(run, n_boot, seed, scorer_factory)
    rows = [decide(c, ctx) for c in CLAIMS]
    per_method = method_rows(ctx)
    return {"run": run.name, "rule": RULE, "n_boot": n_boot, "seed": seed, "counts": counts(rows), "rows": rows,
            "method_counts": counts(per_method), "method_rows": per_method}


def counts(rows: list[dict]) -> dict[str, int]:
    return {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}


def write_claims(run_dir: str | Path, **kwargs) -> dict:
    """Build the ledger and write `RUN_DIR/claims.json`."""
    ledger = build_claims(run_dir, **kwargs)
    write_json(Path(run_dir) / "claims.json", ledger)
    log.info("claims: %s", ", ".join(f"{k} {v}" for k, v in ledger["counts"].items()))
    return ledger


def effect_text(row: dict) -> str:
    """`effect [lo, hi]`, or what is missing."""
    if row["effect"] is None:
        return "–"
    return f"{_f(row['effect'], 4)} {_ci(row['ci95'], 4)}"


def render_text(ledger: dict) -> str:
    """The ledger as plain text, one block per claim (for the terminal)."""
    lines = [f"claims of run {ledger['run']}: " + ", ".join(f"{v} {n}" for v, n in ledger["counts"].items()),
             f"rule: {ledger['rule']}", ""]
    methods = ledger.get("method_rows") or []
    if methods:
        lines[0] += "; per variant of `alternatives`: " + ", ".join(
            f"{v} {n}" for v, n in ledger["method_counts"].items())
    for r in [*ledger["rows"], *methods]:
        lines += [f"[{r['verdict']}] ({r['source']}) {r['claim']}",
                  f"    paper: {r['paper']}", f"    ours:  {r['ours']}",
                  f"    n {r['n'] if r['n'] is not None else '–'}, effect {effect_text(r)}"]
        if r["diagnosis"]:
            lines.append(f"    why:   {r['diagnosis']}")
    return "\n".join(lines) + "\n"

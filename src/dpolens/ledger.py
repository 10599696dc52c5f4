"""The claims ledger's rule and the parts every stage's claims share (layer 2).

A stage declares its claims next to its code (`CLAIMS`, a tuple of `Claim`); each claim's `build`
reads the stage's own output folder through a `StageContext` and returns what it `Measured`.
`decide` turns that into one ledger row by the one rule of the ledger (`verdict`), and
`dpolens.claims` (layer 4) collects the rows of every registered stage into `claims.json`.

Verdict: the paper's direction is the sign of the effect it reports; `holds` iff the 95% interval
excludes zero on that side, `contradicted` iff it excludes zero on the other side, else
`inconclusive`. A row without an interval is never `holds`. A deterministic quantity (the weight
cosines) has the point as its interval. Intervals are seeded bootstraps (dpolens.evaluate) over the
claim's units: prompts paired across models, perplexity windows, validation examples, value vectors,
or neurons where the artifact says so.

A cost the claim names ("at small perplexity") is a guard with its own interval against a stated
bound (PPL ratio within ×PPL_BOUND over at least MIN_GUARD_WINDOWS windows, F1 falling by less than
F1_MARGIN): it passes only when its whole interval is inside the bound; when its whole interval is
outside, the claim is `contradicted` (`Measured.violation`); otherwise `holds` becomes `inconclusive`
(`Measured.guard`), and the row says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dpolens.artifacts import read_json
from dpolens.evaluate import (MIN_PPL_WINDOWS, paired_bootstrap, paired_gap_share, paired_ppl_ratio, percentile_ci,
                              resample_units)
from dpolens.textquality import OVERUSE

VERDICTS = ("holds", "contradicted", "inconclusive", "precondition failed")
RULE = ("holds iff the 95% interval of the effect excludes zero in the paper's direction; contradicted iff it "
        "excludes zero in the opposite direction; otherwise inconclusive. A row without an interval is never holds. "
        "A cost guard passes only when its whole interval is inside its bound (wholly outside: contradicted). A "
        "mechanism claim holds only where it also differs from placebos of the alignment's size in the paper's "
        "direction. A row resting on a claim that does not hold reads precondition failed.")
PPL_BOUND = 1.10  # "small / comparable perplexity": within ×1.10 (issue #15's bound for DPO)
MIN_GUARD_WINDOWS = 20  # a perplexity guard passes only on an interval over this many windows
F1_MARGIN = 0.02  # "small F1 cost": F1 falls by less than this (absolute; the paper's F1 is ~0.19)


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


def counts(rows: list[dict]) -> dict[str, int]:
    return {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}


def apply_preconditions(rows: list[dict], claims: dict[str, Claim]) -> list[dict]:
    """A row whose claim rests on another (`Claim.requires`) that does not hold reads `precondition
    failed`, with the failed row's verdict and effect; its own verdict is kept as `verdict_as_measured`."""
    by_id = {r["id"]: r for r in rows}
    for r in rows:
        c = claims.get(r["id"])
        required = [by_id[q] for q in (c.requires if c else ()) if q in by_id]
        for name, alt in (r.get("alternatives") or {}).items():  # the same rule on the alternative ranking
            unmet = [q for q in required if ((q.get("alternatives") or {}).get(name) or {}).get("verdict") != "holds"]
            if unmet and "verdict_as_measured" not in alt:
                alt["verdict_as_measured"], alt["verdict"] = alt["verdict"], "precondition failed"
        failed = [q for q in required if q["verdict"] != "holds"]
        if failed and "verdict_as_measured" not in r:
            f = failed[0]
            r["verdict_as_measured"] = r["verdict"]
            r["diagnosis"] = (f"precondition failed: it rests on '{f['id']}' ({f['claim']}), which is {f['verdict']} "
                              f"({effect_text(f)}); as measured: {r['verdict']}"
                              + (f"; {r['diagnosis']}" if r["diagnosis"] else "")
                              + "".join(f"; {alternative_text(name, alt, f)}"
                                        for name, alt in (r.get("alternatives") or {}).items()))
            r["verdict"] = "precondition failed"
    return rows


def alternative_text(name: str, alt: dict, failed: dict) -> str:
    """How the row reads on another ranking (`Measured.alternatives`), with that ranking's own precondition
    (the failed row's alternative of the same name) where it was measured."""
    pre = (failed.get("alternatives") or {}).get(name)
    pre_text = (f" (whose own precondition is {pre['verdict']}: {effect_text(pre)})" if pre else
                " (its precondition was not measured for it)")
    measured = alt.get("verdict_as_measured", alt["verdict"])
    return f"with the {name} ranking{pre_text}: {measured} as measured, {effect_text(alt)}"


HOLM_ALPHA = 0.05


def approx_p(effect, ci) -> float | None:
    """Two-sided p of "effect = 0" read off a 95% percentile interval by the normal approximation
    (se = width / 3.92); a zero-width interval (a deterministic effect) gives 0 unless the effect is 0."""
    if not (finite(effect) and ci and all(map(finite, ci))):
        return None
    se = (ci[1] - ci[0]) / (2 * 1.959964)
    if se <= 0:
        return 0.0 if effect != 0 else 1.0
    return math.erfc(abs(effect) / se / math.sqrt(2))


def holm(rows: list[dict], alpha: float = HOLM_ALPHA) -> list[dict]:
    """Holm's step-down over the ledger's rows: each row gets `p_approx` (for a mechanism row the larger of its
    effect's and its aligned − placebo difference's: both must hold) and `verdict_holm`, its verdict where Holm
    rejects at family-wise level `alpha`, else `inconclusive` for a row that held or was contradicted."""
    for r in rows:
        p = approx_p(r.get("effect"), r.get("ci95"))
        if p is not None and r.get("mechanism") and r.get("placebo"):
            q = approx_p(r["placebo"].get("diff"), r["placebo"].get("diff_ci95"))
            p = None if q is None else max(p, q)
        r["p_approx"] = p
    tested = sorted((r for r in rows if r["p_approx"] is not None), key=lambda r: r["p_approx"])
    rejected, m = set(), len(tested)
    for i, r in enumerate(tested):
        if r["p_approx"] > alpha / (m - i):
            break
        rejected.add(id(r))
    for r in rows:
        r["verdict_holm"] = (r["verdict"] if r["verdict"] not in ("holds", "contradicted") or id(r) in rejected
                             else "inconclusive")
    return rows


class StageNotRun(Exception):
    """An artifact the claim needs is missing."""


@dataclass
class StageContext:
    """What a claim's builder sees: its stage's output folder, the bootstrap settings and the run's
    toxicity scorer (made on demand, by name)."""

    folder: Path
    n_boot: int = 2000
    seed: int = 0
    scorer_name: str | None = None  # the scorer the run's evaluations used
    scorer_factory: Callable | None = None
    run: Path | None = None  # the run folder: artifacts are named relative to it (else by the stage folder's name)
    _scorer: object = None

    @property
    def stage(self) -> str:
        if self.run is not None and self.folder.is_relative_to(self.run):
            return self.folder.relative_to(self.run).as_posix()
        return self.folder.name

    def json(self, name: str, required: bool = True):
        """A JSON file of the stage's folder; a missing required one means the stage did not run."""
        data = read_json(self.folder / name)
        if data is None and required:
            raise StageNotRun(f"{self.stage}/{name}")
        return data

    def manifest(self) -> dict:
        return read_json(self.folder / "manifest.json") or {}

    def scorer(self):
        if self._scorer is None:
            from dpolens.scoring import DEFAULT_SCORER, get_scorer

            self._scorer = (self.scorer_factory or get_scorer)(self.scorer_name or DEFAULT_SCORER)
        return self._scorer


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
    guard: str | None = None  # a cost the claim rules out may be exceeded: blocks `holds`, says why
    violation: str | None = None  # the cost's whole interval is outside its bound: the claim is contradicted
    # the same statistic for the control alignment (a placebo of the alignment's size) on the same units:
    # {"effect", "ci95"} of the placebo and {"diff", "diff_ci95"} aligned − placebo (paired where the units are)
    control: dict | None = None
    # the same claim measured on another choice of its inputs, judged by the same rule (guards, placebo): e.g.
    # {"token-writers": Measured} where the row rests on the probe's cosine ranking and that ranking's precondition
    # fails (`apply_preconditions` then names the alternative's verdict)
    alternatives: dict = field(default_factory=dict)

    def against_placebo(self, effect, ci95, diff, diff_ci95, digits: int = 5) -> "Measured":
        """Record the placebo's statistic and aligned − placebo, and say them in `ours` and the diagnosis."""
        self.control = {"effect": effect, "ci95": ci95, "diff": diff, "diff_ci95": diff_ci95}
        text = (f"; placebo {num(effect, digits)} {interval(ci95, digits)}, aligned − placebo {num(diff, digits)} "
                f"{interval(diff_ci95, digits)}")
        self.ours += text
        self.diagnosis += text
        return self


@dataclass(frozen=True)
class Claim:
    id: str
    source: str  # Lee, Yang, review
    claim: str
    paper: str  # the paper's figure, written once in the stage that measures it
    sign: int  # +1: the paper's effect is positive, −1: negative
    rule: str  # what the effect is and which side the paper's lies on
    artifacts: tuple[str, ...]  # files of the stage's folder the claim reads
    build: Callable[[StageContext], Measured]
    # a claim about how the alignment works (not what it does): it holds only where the alignment's
    # effect holds and differs from a placebo's in the paper's direction (`Measured.control`)
    mechanism: bool = False
    # claims (ids) this one rests on: where one of them does not hold, this row reads `precondition failed`
    requires: tuple[str, ...] = ()


def judge(m: Measured, c: Claim) -> tuple[str, str | None, list | None]:
    """The ledger's rule on what a builder measured: (verdict, diagnosis, the interval it rests on)."""
    degenerate = m.ci95 is not None and not all(finite(x) for x in m.ci95)  # e.g. every resample 0/0
    ci95 = None if degenerate else m.ci95
    v = verdict(ci95, c.sign)
    diagnosis = None
    if m.violation:
        diagnosis = (f"the effect holds, but {m.violation}" if v == "holds" else
                     f"{m.violation}; {m.diagnosis}" if v == "inconclusive" else
                     f"interval excludes zero opposite to the paper: {m.diagnosis}; and {m.violation}")
        v = "contradicted"
    elif v == "holds" and m.guard:
        v, diagnosis = "inconclusive", f"the effect holds, but {m.guard}"
    elif v == "holds" and c.mechanism and not (m.control and verdict(m.control.get("diff_ci95"), c.sign) == "holds"):
        v, diagnosis = "inconclusive", "the effect holds for the alignment, but " + (
            "no placebo control was measured: a statistic that holds for any perturbation of this size says "
            "nothing about the alignment" if not m.control else
            "it does not differ from the placebo's in the paper's direction: placebo "
            f"{num(m.control.get('effect'), 5)} {interval(m.control.get('ci95'), 5)}, aligned − placebo "
            f"{num(m.control.get('diff'), 5)} {interval(m.control.get('diff_ci95'), 5)}") + f"; {m.diagnosis}"
    elif v != "holds":
        why = ("interval excludes zero opposite to the paper: " if v == "contradicted" else
               "no finite interval: " if degenerate else
               "" if ci95 is None else "interval includes zero: ")  # without one, the builder says why
        diagnosis = why + m.diagnosis
    return v, diagnosis, ci95


def placebo_block(m: Measured, c: Claim) -> dict | None:
    return {**m.control, "difference_verdict": verdict(m.control.get("diff_ci95"), c.sign)} if m.control else None


def decide(c: Claim, ctx: StageContext) -> dict:
    """One ledger row: the claim measured on the stage's folder, or `inconclusive` when it did not run."""
    try:
        m = c.build(ctx)
    except StageNotRun as e:
        m = Measured(None, None, None, "stage not run", f"stage not run (missing {e})")
    v, diagnosis, ci95 = judge(m, c)
    alternatives = {}
    for name, alt in m.alternatives.items():
        av, adiag, aci = judge(alt, c)
        alternatives[name] = {"effect": alt.effect if finite(alt.effect) else None, "ci95": aci, "verdict": av,
                              "n": alt.n, "ours": alt.ours, "diagnosis": adiag, "placebo": placebo_block(alt, c)}
    return {"id": c.id, "claim": c.claim, "source": c.source, "paper": c.paper, "ours": m.ours, "n": m.n,
            "effect": m.effect if finite(m.effect) else None, "ci95": ci95, "verdict": v, "rule": c.rule,
            "diagnosis": diagnosis, "paper_direction": "> 0" if c.sign > 0 else "< 0", "models": m.models,
            "scorer": m.scorer, "data": m.data, "seed": ctx.seed, "n_boot": ctx.n_boot,
            "artifacts": [f"{ctx.stage}/{a}" for a in c.artifacts], "mechanism": c.mechanism,
            "function": f"{c.build.__module__}.{c.build.__qualname__}",
            "placebo": placebo_block(m, c), "alternatives": alternatives}


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ---- formatting ----------------------------------------------------------------------------------

def num(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:.2e}"


def interval(ci, digits: int = 3) -> str:
    return f"[{num(ci[0], digits)}, {num(ci[1], digits)}]" if ci else "[no interval]"


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def pct_interval(ci) -> str:
    return f"[{pct(ci[0])}, {pct(ci[1])}]" if ci else "[no interval]"


def effect_text(row: dict) -> str:
    """`effect [lo, hi]`, or what is missing."""
    if row["effect"] is None:
        return "–"
    return f"{num(row['effect'], 4)} {interval(row['ci95'], 4)}"


def verdict_cell(row: dict) -> str:
    """`verdict: effect [lo, hi]`, or the verdict alone where nothing was measured (a dose-response cell)."""
    return f"{row['verdict']}: {effect_text(row)}" if row["effect"] is not None else row["verdict"]


def strength_labels(strengths: list[dict]) -> list[str]:
    """Column labels of a dose-response: each strength with the share of the base's toxicity it removed."""
    return [f"{s['strength']} ({s['reduction']:.1%} removed)" if s["reduction"] is not None else s["strength"]
            for s in strengths]


# ---- reading the stages' rows --------------------------------------------------------------------

def identity(d: dict | None) -> dict | None:
    return {k: d.get(k) for k in ("ref", "weight_sha256")} if d else None


def row_of(rows: list[dict], model: str) -> dict | None:
    return next((r for r in rows if r.get("model") == model), None)


class NoUnits(Exception):
    """A row has no per-unit scores (an artifact from before per-prompt scores were kept)."""


def per_prompt(row: dict, what: str) -> list[float]:
    """A row's per-unit scores (`toxicity_per_prompt`, `f1_per_row`): rows written before they
    existed have none, and then no paired interval can be had."""
    values = row.get(what)
    if not values:
        raise NoUnits(what)
    return values


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def stat_block(block: dict | None, key: str) -> tuple[float | None, list[float] | None]:
    """(value, ci95) of `key` in a block, with its interval in the form the stages write:
    {key: {"mean", "ci95"}} (analyze) or {key, "ci95_" + key} (neurons)."""
    if not block:
        return None, None
    v = block.get(key)
    if isinstance(v, dict):
        return v.get("mean"), v.get("ci95")
    return v, block.get(f"ci95_{key}")


# ---- shared measurements -------------------------------------------------------------------------

def ppl_ratio(a: dict, b: dict, ctx: StageContext) -> dict | None:
    """PPL_b / PPL_a, paired over windows, when both rows kept their windows."""
    if not (a.get("ppl_window_nll") and b.get("ppl_window_nll")):
        return None
    return paired_ppl_ratio(a["ppl_window_nll"], a["ppl_window_tokens"], b["ppl_window_nll"], b["ppl_window_tokens"],
                            ctx.n_boot, ctx.seed)


def ppl_text(r: dict | None, a: dict, b: dict) -> str:
    if r:
        ci = interval(r["ci95"]) if r["ci95"] else f"(no interval: fewer than {MIN_PPL_WINDOWS} windows)"
        return f"PPL ×{num(r['ratio'])} {ci} over {r['n']} window{'s' if r['n'] != 1 else ''}"
    if a.get("perplexity") and b.get("perplexity"):
        return f"PPL ×{num(b['perplexity'] / a['perplexity'])} (no per-window NLL, no interval)"
    return "PPL not measured"


def ppl_check(r: dict | None, a: dict, b: dict, two_sided: bool = False) -> tuple[str | None, str | None]:
    """The perplexity guard of PPL_b / PPL_a as (guard, violation): nothing when the ratio's whole
    interval (over at least MIN_GUARD_WINDOWS windows) is within ×PPL_BOUND (and, two_sided, above
    1 / PPL_BOUND); a violation when it is wholly outside; otherwise why it cannot pass."""
    value = r["ratio"] if r else (b["perplexity"] / a["perplexity"] if a.get("perplexity") and b.get("perplexity")
                                  else None)
    if value is None:
        return "perplexity not measured: the cost cannot be bounded", None
    if not (r and r["ci95"] and all(map(finite, r["ci95"])) and r["n"] >= MIN_GUARD_WINDOWS):
        return (f"perplexity ×{num(value)} has no interval over at least {MIN_GUARD_WINDOWS} windows "
                f"({ppl_text(r, a, b)}): it cannot be shown within ×{PPL_BOUND}"), None
    lo, hi = r["ci95"]
    if lo > PPL_BOUND or (two_sided and hi < 1 / PPL_BOUND):
        return None, f"perplexity ×{num(value)} is outside the stated bound ×{PPL_BOUND}: {ppl_text(r, a, b)}"
    if hi > PPL_BOUND or (two_sided and lo < 1 / PPL_BOUND):
        return f"perplexity ×{num(value)} may be outside the stated bound ×{PPL_BOUND}: {ppl_text(r, a, b)}", None
    return None, None


def f1_check(f1: dict | None, text: str) -> tuple[str | None, str | None]:
    """The F1 guard (aligned − base, paired over rows) as (guard, violation), by F1_MARGIN."""
    if not (f1 and f1["ci95"] and all(map(finite, f1["ci95"]))):
        return f"{text}: the F1 cost cannot be bounded", None
    lo, hi = f1["ci95"]
    if hi < -F1_MARGIN:
        return None, f"F1 falls by more than {F1_MARGIN}: {text}"
    if lo < -F1_MARGIN:
        return f"F1 may fall by more than {F1_MARGIN}: {text}", None
    return None, None


def guarded(m: Measured, *checks: tuple[str | None, str | None], suffix: str = "") -> Measured:
    """`m` with the first violation and the first guard of `checks` (each (guard, violation))."""
    m.violation = next((f"{v}{suffix}" for _, v in checks if v), None)
    m.guard = next((f"{g}{suffix}" for g, _ in checks if g), None)
    return m


def gap_share(base, aligned, other, ctx: StageContext) -> tuple[float | None, list[float] | None, dict]:
    """evaluate.paired_gap_share as (share, ci95, gap)."""
    r = paired_gap_share(base, aligned, other, ctx.n_boot, ctx.seed)
    return r["share"], r["ci95"], r["gap"]


def more_than_half(share: float | None, ci: list[float] | None, n: int | None, ours: str, diag: str,
                   prov: dict) -> Measured:
    """The paper says the gap is undone / replicated: the effect is the share of the gap minus one half
    (more than half of it, not merely a move in its direction)."""
    return Measured(None if share is None else share - 0.5, [c - 0.5 for c in ci] if ci else None, n, ours, diag,
                    **prov)


def overuse_check(worst: dict | None) -> tuple[str | None, str | None]:
    """The collapse guard as (guard, violation), from `drift.overuse`'s worst rise (aligned − base share of a
    marker, chosen on half the prompts, measured on the other, maximised inside each replicate): a violation
    when its whole interval is at least OVERUSE, a guard when part of it is."""
    if not worst or not worst.get("rise_ci95") or not all(map(finite, worst["rise_ci95"])):
        return None, None
    lo, hi = worst["rise_ci95"]
    text = (f"'{worst['rise_word']}' is in {pct(worst['rise'])} {pct_interval(worst['rise_ci95'])} more of the aligned "
            "continuations than of the base's (chosen on half the prompts, measured on the other)")
    if lo >= OVERUSE:
        return None, f"the aligned model collapses onto one subject: {text}"
    if hi >= OVERUSE:
        return f"it may collapse onto one subject: {text}", None
    return None, None


def toxicity_drop(base: dict, aligned: dict, ctx: StageContext, prov: dict, where: str,
                  overused: list[dict] | None = None, collapse: dict | None = None) -> Measured:
    """Toxicity aligned − base paired over prompts, guarded by the paired perplexity ratio, the paired F1
    difference and a collapse onto one subject: with `collapse` (drift.overuse's `worst`) by its interval,
    else by the most over-used word's point value."""
    context = f"toxicity {num(base['toxicity']['mean'])} → {num(aligned['toxicity']['mean'])}"
    try:
        r = paired_bootstrap(per_prompt(base, "toxicity_per_prompt"), per_prompt(aligned, "toxicity_per_prompt"),
                             ctx.n_boot, ctx.seed)
    except NoUnits:
        return Measured(aligned["toxicity"]["mean"] - base["toxicity"]["mean"], None, base["toxicity"]["n"], context,
                        f"no per-prompt scores in {where}: no paired interval; {context}", **prov)
    ppl = ppl_ratio(base, aligned, ctx)
    f1 = (paired_bootstrap(base["f1_per_row"], aligned["f1_per_row"], ctx.n_boot, ctx.seed)
          if base.get("f1_per_row") and aligned.get("f1_per_row") else None)
    f1_text = (f"F1 {num(f1['mean_a'])} → {num(f1['mean_b'])}, Δ {num(f1['diff'])} {interval(f1['ci95'])}" if f1
               else "F1 not paired")
    cost = f"{ppl_text(ppl, base, aligned)}; {f1_text}"
    if overused:
        w = overused[0]
        collapse_text = (f"'{w['word']}' in {pct(w['aligned_share'])} of the aligned continuations "
                         f"(base {pct(w['base_share'])})")
        cost += f"; most over-used word {collapse_text}"
    ours = f"{context}, Δ {num(r['diff'])} {interval(r['ci95'])}; {cost}"
    if collapse:
        collapsed = overuse_check(collapse)
    else:
        collapsed = (f"the aligned model collapses onto one subject: {collapse_text}", None) \
            if overused and overused[0]["aligned_share"] - overused[0]["base_share"] >= OVERUSE else (None, None)
    m = Measured(r["diff"], r["ci95"], r["n"], ours, f"Δ toxicity {num(r['diff'])} {interval(r['ci95'])}; {cost}",
                 **prov)
    return guarded(m, ppl_check(ppl, base, aligned), f1_check(f1, f1_text), collapsed)


def weights_moved(w: dict, models: dict) -> Measured:
    """min cosine over tensors − 0.99 (compare.weight_shift's totals; `most_moved` where kept)."""
    effect = w["min_cosine"] - 0.99
    ours = (f"min cosine {w['min_cosine']:.7f} over {w.get('n_tensors')} tensors "
            f"({w.get('changed_tensors')} changed); mean ‖ΔW‖ {num(w['mean_norm_diff'])}, "
            f"max {num(w['max_norm_diff'])}")
    diag = f"min cosine {w['min_cosine']:.7f}"
    if moved := (w.get("most_moved") or [None])[0]:
        diag += (f"; most moved {moved.get('name')} (relative change {num(moved.get('rel_diff'))}, "
                 f"cosine {num(moved.get('cosine'), 6)})")
    return Measured(effect, [effect, effect], w.get("n_tensors"), ours, diag, models)


def _offset_fallback(offset: list[dict]) -> float:
    layers = np.arange(len(offset)) - (len(offset) - 1) / 2
    rel = np.array([o["relative_norm"] for o in offset])
    return float(rel @ layers / (layers @ layers))


def growth(offset: list[dict], stats: dict | None, n_prompts: int | None, prov: dict, where: str) -> Measured:
    """Least-squares slope of ‖δx_l‖/‖x_l‖ over layers, with its interval over prompts where kept."""
    grows = (f"‖δx‖/‖x‖ {num(offset[0]['relative_norm'], 4)} at layer 0 → "
             f"{num(offset[-1]['relative_norm'], 4)} at layer {offset[-1]['layer']}")
    slope, ci = stat_block(stats, "slope")
    if ci is None:
        return Measured(_offset_fallback(offset), None, n_prompts, grows,
                        f"no per-prompt interval ({where} offset_stats); {grows}", **prov)
    text = f"{grows}; slope per layer {num(slope, 5)} {interval(ci, 5)}"
    return Measured(slope, ci, stats["slope"].get("n"), text, text, **prov)


def weakening(rows: list[dict], n_prompts: int | None, prov: dict, ctx: StageContext, where: str,
              plain: dict | None = None) -> Measured:
    """1 − the mean over `rows` (one per transform) of the token-weighted retention, bootstrapped over the
    prompts they share; with `plain` (the plain prompts' row on the same held-out prompts), its retention
    minus theirs, paired in each resample."""
    if plain is not None:
        return _weakening_vs_plain(rows, plain, n_prompts, prov, ctx, where)
    each = "; ".join(f"{r['transform']} {num(r.get('retention_mean', float(np.mean(r['retention']))))}"
                     f"{' ' + interval(r['retention_ci95']) if r.get('retention_ci95') else ''}" for r in rows)
    point = 1 - float(np.mean([r.get("retention_mean", np.mean(r["retention"])) for r in rows]))
    if not all(r.get("retention_per_prompt") for r in rows):
        return Measured(point, None, n_prompts, f"retention {each}",
                        f"no per-prompt retention ({where}): no interval; retention {each}", **prov)
    idx = resample_units(len(rows[0]["retention_per_prompt"]), ctx.n_boot, ctx.seed)
    weak = []
    for r in rows:
        tokens = np.asarray(r["tokens_per_prompt"], dtype=np.float64)
        kept = np.asarray(r["retention_per_prompt"], dtype=np.float64) * tokens
        weak.append(1 - kept[idx].sum(1) / tokens[idx].sum(1))
    ci = percentile_ci(np.mean(weak, axis=0))
    ours = f"1 − retention {num(point)} {interval(ci)}; retention {each}"
    return Measured(point, ci, len(rows[0]["retention_per_prompt"]), ours, ours, **prov)


def _retention_ratio(r: dict, idx=None):
    """Token-weighted retention of a row (per resample with `idx`)."""
    t = np.asarray(r["tokens_per_prompt"], dtype=np.float64)
    k = np.asarray(r["retention_per_prompt"], dtype=np.float64) * t
    return k.sum() / t.sum() if idx is None else k[idx].sum(1) / t[idx].sum(1)


def weakening_replicates(rows: list[dict], plain: dict, ctx: StageContext) -> tuple[float, np.ndarray]:
    """Plain retention − the mean of `rows`' retention: the point value and its [n_boot] resamples over
    the held-out prompts (`resample_units(n, ctx.n_boot, ctx.seed)`: the same resamples for every model
    measured on the same prompts, so a placebo's replicates pair with the aligned model's)."""
    idx = resample_units(len(plain["retention_per_prompt"]), ctx.n_boot, ctx.seed)
    point = _retention_ratio(plain) - float(np.mean([_retention_ratio(r) for r in rows]))
    return point, _retention_ratio(plain, idx) - np.mean([_retention_ratio(r, idx) for r in rows], axis=0)


def weakening_against_placebo(m: Measured, rows: list[dict], plain: dict, control: dict | None,
                              ctx: StageContext) -> Measured:
    """`m` (`weakening` with `plain`) with the placebos' same statistic and aligned − placebo: `control`
    holds K draws' retention rows (`transform`, `draw`, per-prompt retention on the same held-out prompts);
    the difference has `compare.vs_placebos`' prediction interval, the placebo's own interval picks a draw
    in each replicate (`compare.draw_mean`). Unchanged when a draw lacks a transform of `rows`."""
    from dpolens.compare import draw_mean, vs_placebos

    if m.ci95 is None or not control or not control.get("rows"):
        return m
    point, reps = weakening_replicates(rows, plain, ctx)
    draws = []
    for k in range(control["draws"]):
        mine = {r["transform"]: r for r in control["rows"] if r["draw"] == k}
        if "plain" not in mine or any(r["transform"] not in mine for r in rows):
            return m
        draws.append(weakening_replicates([mine[r["transform"]] for r in rows], mine["plain"], ctx))
    points = [d[0] for d in draws]
    ctl_reps = np.stack([d[1] for d in draws])
    diff, ci = vs_placebos(point, reps, points, ctl_reps)
    return m.against_placebo(float(np.mean(points)), percentile_ci(draw_mean(ctl_reps, ctx.seed)), diff, ci, 3)


def offset_control(m: Measured, stats: dict | None, key: str, digits: int = 5) -> Measured:
    """`m` with the placebo's `key` offset statistic and the paired difference (`compare.offset_stats` with
    controls: its `control` and `vs_control` blocks); unchanged without them."""
    if not (stats and stats.get("control")):
        return m
    c, d = stats["control"][key], stats["vs_control"][key]
    return m.against_placebo(c["mean"], c["ci95"], d["mean"], d["ci95"], digits)


def _weakening_vs_plain(rows: list[dict], plain: dict, n_prompts: int | None, prov: dict, ctx: StageContext,
                        where: str) -> Measured:
    ratio = _retention_ratio
    each = "; ".join(f"{r['transform']} {num(ratio(r))}" for r in rows)
    point = ratio(plain) - float(np.mean([ratio(r) for r in rows]))
    n = len(plain["retention_per_prompt"])
    if any(len(r["retention_per_prompt"]) != n for r in rows):
        return Measured(point, None, n, f"plain {num(ratio(plain))}; {each}",
                        f"the transforms were measured on other prompts than plain ({where}): no paired interval",
                        **prov)
    ci = percentile_ci(weakening_replicates(rows, plain, ctx)[1])
    ours = (f"retention on {n} held-out plain prompts {num(ratio(plain))} − on them transformed = {num(point)} "
            f"{interval(ci)}; transformed: {each}")
    return Measured(point, ci, n, ours, ours, **prov)

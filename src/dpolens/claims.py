"""The seeds' claims as a ledger (`claims.json`): which findings of the papers hold on this run.

Each stage declares its claims next to its code (`CLAIMS` in its module, `dpolens.ledger`); this
module only iterates over the registry. One row per claim of Lee et al. (ICML 2024), Yang et al.
("Beyond toxic neurons") and the review's open questions, built from a run directory's artifacts
only (no model is loaded; the run's toxicity scorer is, where a claim scores tokens). Each row holds
the claim, the paper's figure, ours, n, the effect with its 95% interval, the verdict
(`ledger.verdict`), the rule behind it, a one-line diagnosis with numbers for every row that does
not hold, and the models, scorer, data and bootstrap seed.

What spans stages lives here: the run's scorer (from the stages' manifests), and the method rows:
a stage that compares other alignments (`variant_measures`, the `alternatives` stage) measures
other stages' claims again per variant, and each is decided by the same claim's rule.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable

from dpolens.artifacts import DpolensError, read_json, write_json, write_text
from dpolens.ledger import (
    HOLM_ALPHA,
    RULE,
    VERDICTS,
    Claim,
    StageContext,
    apply_preconditions,
    counts,
    decide,
    effect_text,
    holm,
    strength_labels,
    verdict_cell,
)
from dpolens.stages import REGISTRY, Stage

log = logging.getLogger(__name__)

__all__ = ["build_claims", "write_claims", "dose_response", "write_dose_response", "render_dose", "render_text", "registered_claims", "effect_text", "RULE", "across_runs",
           "render_across"]


def registered_claims() -> list[tuple[Stage, Claim]]:
    """Every registered stage's claims, in run order."""
    return [(st, c) for st in REGISTRY for c in st.claims]


def run_scorer(run: Path) -> str:
    """The toxicity scorer the run's evaluations used: the first stage manifest that names one
    (`eval.scorer`, or `scorer`), else dpolens's default."""
    for st in REGISTRY:
        cfg = (read_json(run / st.name / "manifest.json") or {}).get("config") or {}
        if name := (cfg.get("eval") or {}).get("scorer") or cfg.get("scorer"):
            return name
    from dpolens.scoring import DEFAULT_SCORER

    return DEFAULT_SCORER


def _study_config(run: Path) -> dict:
    """The study config recorded in results.json ({} without a readable one)."""
    try:
        return ((read_json(run / "results.json") or {}).get("provenance") or {}).get("config") or {}
    except DpolensError:
        return {}


def run_seed(run: Path) -> int:
    """The study's seed (results.json's config), which the ledger's bootstraps use; 0 without one."""
    return int(_study_config(run).get("seed", 0))


def method_rows(run: Path, context: Callable[[Path], StageContext]) -> list[dict]:
    """The claims a comparing stage measures again for each variant it compares (alignment methods or
    trainable-parameter variants). Each row is the original claim's row, decided by the same rule,
    with `variant` and `method` added."""
    by_id = {c.id: c for _, c in registered_claims()}
    out = []
    for st in REGISTRY:
        if not (measure := getattr(st.module, "variant_measures", None)):
            continue
        ctx = context(run / st.name)
        for v in measure(ctx):
            label = v["variant"]
            for cid, build in v["measures"].items():
                c = by_id[cid]
                row = decide(replace(c, id=f"{label}:{cid}", claim=f"{label}: {c.claim.removeprefix('DPO ')}",
                                     paper=f"DPO: {c.paper}", artifacts=tuple(v.get("artifacts", ())),
                                     build=lambda _ctx, b=build: b()), ctx)
                out.append({**row, "variant": label, "method": v.get("method")})
    return out


def build_claims(run_dir: str | Path, n_boot: int = 2000, seed: int | None = None,
                 scorer_factory: Callable | None = None, folders: dict[str, str | Path] | None = None) -> dict:
    """The ledger of a run directory: every claim's row, the rule, and the count per verdict. The
    bootstrap seed is the study's (`run_seed`) unless given. `folders` reads some stages from elsewhere
    than run/<stage> (a dose-response strength); the variants of `alternatives` are then left out."""
    run = Path(run_dir)
    if not run.is_dir():
        raise DpolensError(f"run directory not found: {run}")
    seed = run_seed(run) if seed is None else seed
    scorer_name, shared = run_scorer(run), {}
    where = {st.name: run / st.name for st in REGISTRY} | {k: Path(v) for k, v in (folders or {}).items()}

    def context(folder: Path) -> StageContext:
        ctx = StageContext(folder, n_boot, seed, scorer_name, scorer_factory, run)
        if "scorer" in shared:  # one scorer for the whole ledger, made at most once
            ctx._scorer = shared["scorer"]
        return ctx

    rows = []
    for st in REGISTRY:
        ctx = context(where[st.name])
        rows += [decide(c, ctx) for c in st.claims]
        if ctx._scorer is not None:
            shared["scorer"] = ctx._scorer
    apply_preconditions(rows, {c.id: c for _, c in registered_claims()})
    holm(rows)
    per_method = [] if folders else method_rows(run, context)
    return {"run": run.name, "rule": RULE, "n_boot": n_boot, "seed": seed, "counts": counts(rows), "rows": rows,
            "counts_holm": {v: sum(r["verdict_holm"] == v for r in rows) for v in VERDICTS},
            "holm": f"Holm's step-down over the {sum(r['p_approx'] is not None for r in rows)} rows with an interval, "
                    f"family-wise level {HOLM_ALPHA}; p read off each 95% interval (normal approximation)",
            "method_counts": counts(per_method), "method_rows": per_method}


def dose_response(run_dir: str | Path, stages: list[str], n_boot: int = 2000, seed: int | None = None,
                  scorer_factory: Callable | None = None) -> dict:
    """Every ledger row at each strength of the alignment: the analysed model's ledger (claims.json) and, per
    checkpoint dpo kept (dpo/strengths/<pct>), the ledger with dpo's rows from that checkpoint's evaluation and
    `stages` from runs/<name>/strength-<pct>/ (the other stages are shared). Per claim: the effect, interval and
    verdict at each strength against the toxicity reduction on the evaluation prompts, and whether the
    verdict flips."""
    from dpolens.pipeline import kept_strengths, strength_folders

    from dpolens.stages import stage

    run = Path(run_dir)
    reduction = stage("dpo").module.reduction_of  # the relative toxicity reduction a dpo folder evaluated

    points = [{"strength": "analysed", "reduction": reduction(run / "dpo"),
               "ledger": build_claims(run, n_boot, seed, scorer_factory)}]
    for label in kept_strengths(run):
        folders = strength_folders(run, label, stages)
        points.append({"strength": f"{label}%", "reduction": reduction(Path(folders["dpo"])),
                       "ledger": build_claims(run, n_boot, seed, scorer_factory, folders)})
    points.sort(key=lambda p: (p["reduction"] is None, p["reduction"] or 0.0))
    # rows of stages that read the aligned model but were not repeated describe the analysed model only
    stage_of = {c.id: st.name for st, c in registered_claims()}
    unrepeated = {st.name for st in REGISTRY if "dpo" in st.inputs} - set(stages)
    claims = []
    for r in points[0]["ledger"]["rows"]:
        at = [{"strength": p["strength"], "reduction": p["reduction"],
               **({k: row[k] for k in ("effect", "ci95", "verdict")}
                  if p["strength"] == "analysed" or stage_of.get(r["id"]) not in unrepeated
                  else {"effect": None, "ci95": None, "verdict": "not measured"})}
              for p in points for row in p["ledger"]["rows"] if row["id"] == r["id"]]
        measured = {x["verdict"] for x in at if x["verdict"] != "not measured"}
        claims.append({"id": r["id"], "claim": r["claim"], "source": r["source"], "at": at,
                       "flips": len(measured) > 1})
    keep = [c["id"] for c in claims if not c["flips"]]
    return {"run": run.name, "stages_repeated": stages,
            "strengths": [{"strength": p["strength"], "reduction": p["reduction"], "counts": p["ledger"]["counts"]}
                          for p in points],
            "claims": claims,
            "summary": {"strengths": [p["strength"] for p in points], "keep_verdict": keep,
                        "flip": [c["id"] for c in claims if c["flips"]]}}


def write_dose_response(run_dir: str | Path, stages: list[str], **kwargs) -> dict:
    """`dose_response` into RUN_DIR/dose_response.json, with its figure (one panel per claim)."""
    from dpolens import figures

    d = dose_response(run_dir, stages, **kwargs)
    d["figures"] = figures.claims_dose_figure(Path(run_dir), d["claims"]) if len(d["strengths"]) > 1 else []
    write_json(Path(run_dir) / "dose_response.json", d)
    write_text(Path(run_dir) / "dose_response.md", render_dose(d))
    log.info("dose-response over %d strengths: %d claims keep their verdict, %d flip", len(d["strengths"]),
             len(d["summary"]["keep_verdict"]), len(d["summary"]["flip"]))
    return d


def write_claims(run_dir: str | Path, **kwargs) -> dict:
    """Build the ledger and write `RUN_DIR/claims.json`."""
    ledger = build_claims(run_dir, **kwargs)
    write_json(Path(run_dir) / "claims.json", ledger)
    log.info("claims: %s", ", ".join(f"{k} {v}" for k, v in ledger["counts"].items()))
    return ledger


def run_model(run: Path) -> str:
    """The model a run studied (results.json's config), else the run folder's name."""
    return str(_study_config(run).get("model") or run.name)


def across_runs(ledgers: list[dict], labels: list[str]) -> dict:
    """The same claims on several runs (e.g. two model families) side by side: per claim, each run's
    effect, interval and verdict, and which claims hold on every run, on some, on none."""
    ids = list(dict.fromkeys(r["id"] for led in ledgers for r in led["rows"]))
    rows = []
    for cid in ids:
        per = {}
        for label, led in zip(labels, ledgers):
            r = next((x for x in led["rows"] if x["id"] == cid), None)
            per[label] = ({"effect": r["effect"], "ci95": r["ci95"], "verdict": r["verdict"], "n": r["n"],
                           "verdict_holm": r.get("verdict_holm"),
                           "alternatives": {k: {"effect": a["effect"], "ci95": a["ci95"], "verdict": a["verdict"]}
                                            for k, a in (r.get("alternatives") or {}).items()}}
                          if r else {"effect": None, "ci95": None, "verdict": "not measured", "n": None})
        first = next(x for led in ledgers for x in led["rows"] if x["id"] == cid)
        holds = sum(v["verdict"] == "holds" for v in per.values())
        rows.append({"id": cid, "claim": first["claim"], "source": first["source"], "runs": per,
                     "holds_on": "all" if holds == len(labels) else "none" if holds == 0 else "some"})
    summary = {k: [r["id"] for r in rows if r["holds_on"] == k] for k in ("all", "some", "none")}
    return {"runs": labels, "rule": RULE, "rows": rows, "summary": summary}


def render_across(table: dict) -> str:
    """The cross-run ledger as a Markdown table and its summary."""
    labels = table["runs"]
    lines = ["| claim | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for r in table["rows"]:
        cells = [f"{v['verdict']}: {effect_text(v) if v['effect'] is not None else '–'}"
                 + "".join(f"; {k}: {a['verdict']} {effect_text(a)}" for k, a in (v.get("alternatives") or {}).items())
                 for v in r["runs"].values()]
        lines.append(f"| ({r['source']}) {r['claim']} | " + " | ".join(cells) + " |")
    s = table["summary"]
    lines += ["", f"holds on all {len(labels)}: {len(s['all'])} ({', '.join(s['all']) or '–'}); on some: "
              f"{len(s['some'])} ({', '.join(s['some']) or '–'}); on none: {len(s['none'])}"]
    return "\n".join(lines) + "\n"


def render_dose(d: dict) -> str:
    """The dose-response as a Markdown table: per claim, effect [95% interval] and verdict at each strength
    (ordered by the toxicity reduction on the evaluation prompts), and whether the verdict flips."""
    labels = strength_labels(d["strengths"])
    lines = ["| claim | " + " | ".join(labels) + " | verdict |", "|---|" + "---|" * (len(labels) + 1)]
    for c in d["claims"]:
        lines.append(f"| ({c['source']}) {c['id']}: {c['claim']} | " + " | ".join(verdict_cell(a) for a in c["at"]) +
                     f" | {'flips' if c['flips'] else 'kept'} |")
    s = d["summary"]
    lines += ["", f"stages repeated at each strength: {', '.join(d['stages_repeated']) or '–'} (the others shared); "
              f"{len(s['keep_verdict'])} claims keep their verdict, {len(s['flip'])} flip"
              + (f" ({', '.join(s['flip'])})" if s["flip"] else "")]
    return "\n".join(lines) + "\n"


def render_text(ledger: dict) -> str:
    """The ledger as plain text, one block per claim (for the terminal)."""
    lines = [f"claims of run {ledger['run']}: " + ", ".join(f"{v} {n}" for v, n in ledger["counts"].items()),
             f"rule: {ledger['rule']}"]
    if "counts_holm" in ledger:
        lines.append("Holm-adjusted: " + ", ".join(f"{v} {n}" for v, n in ledger["counts_holm"].items()) +
                     f" ({ledger['holm']})")
    lines.append("")
    methods = ledger.get("method_rows") or []
    if methods:
        lines[0] += "; per variant of `alternatives`: " + ", ".join(
            f"{v} {n}" for v, n in ledger["method_counts"].items())
    for r in [*ledger["rows"], *methods]:
        lines += [f"[{r['verdict']}] ({r['source']}) {r['claim']}",
                  f"    paper: {r['paper']}", f"    ours:  {r['ours']}",
                  f"    n {r['n'] if r['n'] is not None else '–'}, effect {effect_text(r)}"
                  + (f", Holm-adjusted: {r['verdict_holm']}" if r.get("verdict_holm", r["verdict"]) != r["verdict"]
                     else "")]
        if r["diagnosis"]:
            lines.append(f"    why:   {r['diagnosis']}")
        for name, a in (r.get("alternatives") or {}).items():
            lines.append(f"    {name}: [{a['verdict']}] effect {effect_text(a)}"
                         + (f" (as measured: {a['verdict_as_measured']})" if a.get("verdict_as_measured") else ""))
    return "\n".join(lines) + "\n"

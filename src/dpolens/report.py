"""`dpolens report RUN_DIR`: one self-contained HTML page with every table and figure of a run,
opening with the claims ledger (which of the seeds' claims hold, dpolens.claims).

Images are embedded (base64), each table and figure has a one-line caption, and the paper's
number stands beside ours where the paper has one (gpt2-medium, Perspective API: compare
directions and ratios, not absolute values, across models and scorers).
"""

from __future__ import annotations

from pathlib import Path

from dpolens.artifacts import DpolensError, check_output, read_json, write_text
from dpolens.ledger import effect_text, strength_labels, verdict_cell
from dpolens.stages import REGISTRY
from dpolens.webpage import Markup, esc, image, table


def _placebo_text(row: dict) -> str:
    """A mechanism row's placebo effect and the alignment − placebo difference, or why there is none."""
    p = row.get("placebo")
    if not p:
        return "no control measured" if row.get("mechanism") else "–"
    return (f"{effect_text({'effect': p.get('effect'), 'ci95': p.get('ci95')})}; aligned − placebo "
            f"{effect_text({'effect': p.get('diff'), 'ci95': p.get('diff_ci95')})}")


OTHER_RANKING = "other ranking (not Holm-adjusted)"


def _alternatives_text(row: dict) -> str:
    """The row's verdict on other rankings of its inputs (the token writers), or –."""
    alts = row.get("alternatives") or {}
    return "; ".join(f"{name}: {a['verdict']}" + (f" (as measured: {a['verdict_as_measured']})"
                                                  if a.get("verdict_as_measured") else "") + f", {effect_text(a)}"
                     for name, a in alts.items()) or "–"


def _sources(row: dict) -> str:
    """The function that measured a row and links to the artifact files it read (relative to the run folder)."""
    links = ", ".join(f'<a href="{esc(a)}">{esc(a)}</a>' for a in row.get("artifacts") or [])
    return (f"<code>{esc(row['function'])}</code>; " if row.get("function") else "") + links


def claims_section(run: Path) -> str:
    """The claims ledger (dpolens.claims) as the page's first table; built when claims.json is missing."""
    from dpolens.claims import write_claims

    ledger = read_json(run / "claims.json") or write_claims(run)
    rows = [{"claim": f"({r['source']}) {r['claim']}", "paper": r["paper"], "ours": r["ours"], "n": r["n"],
             "effect [95% CI]": effect_text(r), "placebo [95% CI]": _placebo_text(r), "verdict": r["verdict"],
             "Holm": r.get("verdict_holm", "–"), OTHER_RANKING: _alternatives_text(r), "diagnosis": r["diagnosis"],
             "from": Markup(_sources(r))}
            for r in ledger["rows"]]
    cols = ["claim", "paper", "ours", "n", "effect [95% CI]", "placebo [95% CI]", "verdict", "Holm", OTHER_RANKING,
            "diagnosis", "from"]
    counts = ", ".join(f"{n} {v}" for v, n in ledger["counts"].items())
    if "counts_holm" in ledger:
        counts += "; Holm-adjusted: " + ", ".join(f"{n} {v}" for v, n in ledger["counts_holm"].items())
    html = "<h2>Claims</h2>" + table(rows, cols,
                                     f"Which of the seeds' claims hold on this run ({counts}). Rule: {ledger['rule']} "
                                     "Placebo: the same statistic for placebos (the base plus noise of the alignment's "
                                     "size, tensor by tensor) on the same units. Other ranking: the rows that rest "
                                     "on the toxic vectors, measured again with the toxic neurons ranked as token "
                                     "writers (the value vectors that most promote the probe's top tokens), each "
                                     "judged by the same rule and by that ranking's own precondition. "
                                     f"Intervals: seeded bootstraps ({ledger['n_boot']} resamples, seed "
                                     f"{ledger['seed']}); models, scorer and data of each row in claims.json.")
    if methods := ledger.get("method_rows"):
        counts = ", ".join(f"{n} {v}" for v, n in ledger["method_counts"].items())
        html += table([{"claim": r["claim"], "paper": r["paper"], "ours": r["ours"], "n": r["n"],
                        "effect [95% CI]": effect_text(r), "verdict": r["verdict"], "diagnosis": r["diagnosis"]}
                       for r in methods], cols,
                      f"The same claims for each variant that `alternatives` compares (other alignment methods, other "
                      f"trainable parameters; {counts}), decided by the same rule on its prompts.")
    return html


def dose_section(run: Path) -> str:
    """Every ledger row at each strength of the alignment (dose_response.json), when the study made one."""
    if not (d := read_json(run / "dose_response.json")):
        return ""
    labels = strength_labels(d["strengths"])
    rows = [{"claim": c["id"], **{lab: verdict_cell(a) for lab, a in zip(labels, c["at"])},
             "flips": "yes" if c["flips"] else ""} for c in d["claims"]]
    fig = run / "fig_dose_response_claims.png"
    return ("<h2>Claims at each strength of the alignment</h2>" +
            table(rows, ["claim", *labels, "flips"],
                  f"Every ledger row decided at each checkpoint dpo kept ({', '.join(d['stages_repeated'])} repeated "
                  f"on it; the other stages shared). {len(d['summary']['keep_verdict'])} claims keep their verdict, "
                  f"{len(d['summary']['flip'])} flip: a verdict that flips with strength describes that strength, "
                  "not DPO.") +
            (image(fig, "Each claim's effect and 95% interval against the toxicity reduction (green holds, red "
                        "contradicted, grey inconclusive, orange precondition failed).") if fig.exists() else ""))


def render(run: Path) -> str:
    res = read_json(run / "results.json") or {}  # a damaged file fails here, before claims.json is written
    parts = [f"<h1>dpolens study: {esc(run.name)}</h1>", claims_section(run), dose_section(run)]
    parts += [st.section(run / st.name, res.get(st.name) or st.headline(run / st.name),
                         read_json(run / st.name / "manifest.json") or {})
              for st in REGISTRY if (run / st.name).exists()]
    prov = res.get("provenance", {})
    parts.append("<h2>Provenance</h2>")
    parts.append(table([{"git": prov.get("git_revision"), "created": prov.get("created"),
                         "wall_time_s": res.get("wall_time_s"), "stage_time_s": res.get("stage_time_s")}],
                       ["git", "created", "wall_time_s", "stage_time_s"],
                       "Code revision, wall time of the last invocation and the stages' summed time over all "
                       "invocations (versions and configs in results.json)."))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
             "img{max-width:100%}figcaption{color:#555;font-size:13px;margin:4px 0 18px}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>dpolens {esc(run.name)}</title>" \
           f"<style>{style}</style></head><body>{''.join(p for p in parts if p)}</body></html>"


def write_report(run_dir: str | Path) -> Path:
    run = Path(run_dir)
    if not run.is_dir():
        raise DpolensError(f"run folder not found: {run}")
    if not (run / "results.json").exists() and not any((run / st.name).is_dir() for st in REGISTRY):
        raise DpolensError(f"{run} holds no stage outputs and no results.json: not a `dpolens run` folder")
    out = run / "report.html"
    check_output(out, is_file=True)
    write_text(out, render(run))
    return out

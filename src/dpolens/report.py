"""`dpolens report RUN_DIR`: one self-contained HTML page with every table and figure of a run,
opening with the claims ledger (which of the seeds' claims hold, dpolens.claims).

Images are embedded (base64), each table and figure has a one-line caption, and the paper's
number stands beside ours where the paper has one (gpt2-medium, Perspective API: compare
directions and ratios, not absolute values, across models and scorers).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from dpolens.artifacts import read_json, write_text

PAPER = {
    "probe_accuracy": "94% (Jigsaw, gpt2-medium; majority baseline ~90%)",
    "table2": {"none": "0.453 / 21.70 / 0.193", "probe": "0.329 / 21.54 / 0.190",
               "mlp.v": "0.352 / 21.63 / 0.189 (MLP.v 19.770)", "svd.u0": "0.334 / 21.54 / 0.190"},
    "dpo": "toxicity 0.453 → 0.208, PPL 21.70 → 23.34, F1 0.193 → 0.195",
    "weight_shift": "every cosine > 0.99; mean norm difference < 1e-5 (unembedding up to 1e-3)",
    "unalign": "0.208 → 0.458 (base 0.453) with PPL 23.30",
    "toxic_neurons": "4.9% of the positive reduction (2.333 / 47.96); 32% of the net (7.22)",
}


def _esc(x) -> str:
    return html.escape(str(x))


def _fmt(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.7f}" if 0.999 < abs(x) < 1 else f"{x:.4g}"  # cosines near 1 must not print as 1
    if isinstance(x, dict) and "mean" in x:
        ci = x.get("ci95")
        return f"{x['mean']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
    if isinstance(x, list) and x and isinstance(x[0], float):
        return ", ".join(f"{v:.3f}" for v in x)
    return _esc(x)


def table(rows: list[dict], cols: list[str], caption: str) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<figure><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>" \
           f"<figcaption>{_esc(caption)}</figcaption></figure>"


def image(path: Path, caption: str) -> str:
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{_esc(path.stem)}" src="data:image/png;base64,{data}">' \
           f"<figcaption>{_esc(caption)}</figcaption></figure>"


def claims_section(run: Path) -> str:
    """The claims ledger (dpolens.claims) as the page's first table; built when claims.json is missing."""
    from dpolens.claims import effect_text, write_claims

    ledger = read_json(run / "claims.json") or write_claims(run)
    rows = [{"claim": f"({r['source']}) {r['claim']}", "paper": r["paper"], "ours": r["ours"], "n": r["n"],
             "effect [95% CI]": effect_text(r), "verdict": r["verdict"], "diagnosis": r["diagnosis"]}
            for r in ledger["rows"]]
    counts = ", ".join(f"{n} {v}" for v, n in ledger["counts"].items())
    return "<h2>Claims</h2>" + table(rows, ["claim", "paper", "ours", "n", "effect [95% CI]", "verdict", "diagnosis"],
                                     f"Which of the seeds' claims hold on this run ({counts}). Rule: {ledger['rule']} "
                                     f"Intervals: seeded bootstraps ({ledger['n_boot']} resamples, seed "
                                     f"{ledger['seed']}); models, scorer and data of each row in claims.json.")


def pairs_section(p: dict) -> str:
    """The pairs' quality block beside three sample pairs: a DPO learns whatever separates the sides."""
    q = p["quality"]
    cols = ["toxicity", "nll_per_token", "special_token_share", "distinct_2", "repeated_ngram_rate", "mean_words"]
    rows = [{"side": side, **q[side]} for side in ("preferred", "dispreferred")]
    dropped = ", ".join(f"{k} {v}" for k, v in (p.get("dropped") or {}).items()) or "none"
    out = table(rows, ["side"] + cols,
                f"{q['n']} pairs ({p['method']}, prompts: {p.get('prompt_source')}) kept from {p.get('n_candidates')} "
                f"candidates (dropped: {dropped}). Dispreferred more toxic in "
                f"{q['share_dispreferred_more_toxic']:.0%} of pairs, mean toxicity gap {q['mean_toxicity_gap']:.3f}, "
                f"mean NLL gap {q['mean_nll_gap']:.2f} nats/token under the base model.")
    samples = [{"prompt": s["prompt_text"], "preferred": s["unpert_gen_text"], "dispreferred": s["pert_gen_text"],
                "toxicity (pref / dispref)": f"{s['preferred_toxicity']:.3f} / {s['dispreferred_toxicity']:.3f}"}
               for s in p.get("samples") or []]
    return out + table(samples, ["prompt", "preferred", "dispreferred", "toxicity (pref / dispref)"],
                       "Three of the pairs the DPO learns from.")


def render(run: Path) -> str:
    parts = [f"<h1>dpolens study: {_esc(run.name)}</h1>", claims_section(run)]
    res = read_json(run / "results.json") or {}
    if (m := res.get("probe")):
        parts.append("<h2>Toxicity probe (paper 3.1)</h2>")
        parts.append(table([m], list(m), f"Validation metrics of the probe. Paper: {PAPER['probe_accuracy']}."))
    if (t1 := run / "vectors" / "toxic_vectors.json").exists():
        rows = [{**r, "top_tokens": ", ".join(r["top_tokens"][:8])} for r in read_json(t1)[:10]]
        parts.append("<h2>Toxic value vectors (Table 1)</h2>")
        parts.append(table(rows, ["layer", "neuron", "cosine", "top_tokens"],
                           "The 10 value vectors most similar to the probe and their top tokens."))
    if (tw := read_json(run / "vectors" / "token_writers.json")):
        rows = [{**r, "top_tokens": ", ".join(r["top_tokens"][:8])} for r in tw["rows"][:5]]
        parts.append(table(rows, ["layer", "neuron", "score", "cosine", "cosine_rank", "top_tokens"],
                           "Diagnostic: the value vectors that most promote the probe's own top tokens "
                           f"({', '.join(t.strip() for t in tw['probe_tokens'])}), and where the cosine "
                           f"ranks them (median rank of the top {len(tw['rows'])}: {tw['median_cosine_rank']:.0f})."))
    if (t2 := read_json(run / "table2" / "table.json")):
        rows = [{**r, "paper (tox / PPL / F1)": PAPER["table2"].get(r["vector"].split(" ")[0], "")}
                for r in t2["rows"]]
        parts.append("<h2>Residual interventions (Table 2)</h2>")
        parts.append(table(rows, ["method", "vector", "alpha", "alpha_rel", "toxicity", "perplexity", "f1",
                                  "paper (tox / PPL / F1)"],
                           "Subtracting toxic directions from the last residual at a calibrated α."))
    if (pq := res.get("pairs")) and pq.get("quality"):
        parts.append("<h2>Preference pairs (paper 4.2)</h2>")
        parts.append(pairs_section(pq))
    if (d := res.get("dpo_eval")):
        parts.append("<h2>DPO (paper 4)</h2>")
        parts.append(table(d, ["model", "toxicity", "perplexity", "f1", "repetition"],
                           f"Base vs aligned on held-out challenge prompts. Paper: {PAPER['dpo']}."))
        for w in (res.get("dpo") or {}).get("warnings") or []:
            parts.append(f"<p><b>Warning:</b> {_esc(w)}</p>")
    if (w := res.get("weight_shift")):
        parts.append(table([{k: w[k] for k in ("min_cosine", "mean_norm_diff", "all_above_0_99")}],
                           ["min_cosine", "mean_norm_diff", "all_above_0_99"],
                           f"How far DPO moved the weights. Paper: {PAPER['weight_shift']}."))
    an = run / "analyze"
    if an.exists():
        parts.append("<h2>How the aligned model avoids toxicity (paper 5)</h2>")
        parts.append(image(an / "fig1_logit_lens.png", "Figure 1: probability of the toxic token read out "
                                                         "after every sub-layer, base vs aligned."))
        parts.append(image(an / "fig2_activation_drop.png", "Figure 2: mean activation of the top toxic "
                                                              "neurons, base vs aligned."))
        parts.append(image(an / "fig_offset_by_layer.png", "Size of the residual offset δx per layer and its "
                                                             "cosine with the probe."))
        for f in sorted(an.glob("fig4_projection_L*.png")):
            parts.append(image(f, "Figure 4: residuals projected on δx̂ and PC1; dotted lines join a prompt."))
        for f in sorted(an.glob("fig5_value_shifts_L*.png")):
            parts.append(image(f, "Figures 5, 7-10: cosine of earlier layers' value-vector shifts with δx, "
                                  "beside their mean activations."))
    if (u := res.get("unalign")):
        parts.append("<h2>Un-aligning by key scaling (Table 4)</h2>")
        parts.append(table(u, ["model", "toxicity", "perplexity", "f1"],
                           f"Scaling 7 toxic keys ×10 in the aligned model. Paper: {PAPER['unalign']}."))
    if (g := res.get("neuron_groups")):
        parts.append("<h2>Neuron groups (Yang et al.)</h2>")
        rows = [{"group": k, **v} for k, v in g["groups"].items()]
        parts.append(table(rows, ["group", "count", "reduction", "share_of_positive", "share_of_net"],
                           "Share of the reduction of the probe projection per neuron group."))
        tn = g["toxic_neurons"]
        parts.append(table([tn], ["count", "share_of_positive", "share_of_net"],
                           f"Top toxic neurons that were active and dampened. Paper: {PAPER['toxic_neurons']}."))
        for f in ("fig_groups_by_layer", "fig_cumulative_share", "fig_neuron_scatter"):
            parts.append(image(run / "neurons" / f"{f}.png", f.replace("fig_", "").replace("_", " ") + "."))
    if (pt := res.get("patching")):
        ref = res.get("patching_reference") or {}
        rows = [{**ref[m], "groups": f"none ({m} model)"} for m in ("base", "aligned") if m in ref]
        rows += [{**s, "groups": "+".join(s["groups"])} for s in pt]
        rule = f" Patch: {ref['rule']}." if "rule" in ref else ""
        parts.append(table(rows, ["groups", "n_neurons", "toxicity", "perplexity", "f1"],
                           "Cumulative activation patching of the base model on held-out prompts." + rule))
    if (rb := res.get("robustness")):
        rows = [{**r, "retention": (sum(r["retention"]) / len(r["retention"])) if r["retention"] else None}
                for r in rb]
        parts.append("<h2>Robustness of the offset (beyond the paper)</h2>")
        parts.append(table(rows, ["transform", "model", "toxicity", "retention"],
                           "Toxicity and mean offset retention under transformed and multi-turn prompts."))
        parts.append(image(run / "robustness" / "fig_retention.png", "Offset retention by layer."))
        if (fs := res.get("robustness_findings")):
            parts.append("<p><b>Does the offset persist?</b></p><ul>" +
                         "".join(f"<li>{_esc(f)}</li>" for f in fs) + "</ul>")
    if (alt := res.get("alternatives")):
        rows = [{**r, "min_cosine": r.get("weight_shift", {}).get("min_cosine"),
                 "toxicity_unaligned": r.get("unaligned", {}).get("toxicity")} for r in alt]
        parts.append("<h2>Alternative alignments (paper 6.1-6.2)</h2>")
        parts.append(table(rows, ["variant", "trainable", "loss", "toxicity", "perplexity", "min_cosine",
                                  "offset_mean_relative_norm", "toxicity_unaligned", "unalign_recovery"],
                           "Variants trained with the same DPO engine and pairs; recovery = share of the "
                           "toxicity gap that key scaling brings back."))
        parts.append(f"<p><b>Which alignment is hardest to undo?</b> {_esc(res.get('alternatives_finding'))}</p>")
    prov = res.get("provenance", {})
    parts.append("<h2>Provenance</h2>")
    parts.append(table([{"git": prov.get("git_revision"), "created": prov.get("created"),
                         "wall_time_s": res.get("wall_time_s")}], ["git", "created", "wall_time_s"],
                       "Code revision and wall time of the run (versions and configs in results.json)."))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
             "img{max-width:100%}figcaption{color:#555;font-size:13px;margin:4px 0 18px}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>dpolens {_esc(run.name)}</title>" \
           f"<style>{style}</style></head><body>{''.join(p for p in parts if p)}</body></html>"


def write_report(run_dir: str | Path) -> Path:
    run = Path(run_dir)
    out = run / "report.html"
    write_text(out, render(run))
    return out

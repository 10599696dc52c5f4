"""Figures of the analysis stage (the paper's Figures 1, 2, 4, 5/7-10), saved as PNG and PDF."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

COLORS = {"base": "#d62728", "aligned": "#1f77b4"}


def _save(fig, out: Path, name: str) -> list[str]:
    paths = []
    for ext in ("png", "pdf"):
        p = out / f"{name}.{ext}"
        fig.savefig(p, dpi=130, bbox_inches="tight")
        paths.append(p.name)
    plt.close(fig)
    return paths


def logit_lens_figure(out: Path, lens: dict, base_ref: str, aligned_ref: str) -> list[str]:
    fig, ax = plt.subplots(figsize=(11, 4))
    x = np.arange(len(lens["labels"]))
    ax.plot(x, lens["base"], "-o", ms=3, color=COLORS["base"], label=f"base ({base_ref})")
    ax.plot(x, lens["aligned"], "-o", ms=3, color=COLORS["aligned"], label=f"aligned ({aligned_ref})")
    gains = [(lens["base"][i] - lens["base"][i - 1], i) for i in range(1, len(x)) if not lens["labels"][i].endswith("_mid")]
    for _, i in sorted(gains, reverse=True)[:3]:
        ax.axvspan(i - 1, i, color="grey", alpha=0.25)
    ax.set_xticks(x[1::2])
    ax.set_xticklabels([lbl for lbl in lens["labels"][1::2]], rotation=90, fontsize=7)
    ax.set_xlabel("sub-layer (l_mid: after attention; l: after the MLP); shaded: the 3 MLPs that promote it most")
    ax.set_ylabel(f"P({lens['token']!r})")
    ax.set_title(f"Figure 1 — logit lens on {lens['n_prompts']} prompts whose base next token is {lens['token']!r}")
    ax.legend()
    return _save(fig, out, "fig1_logit_lens")


def activation_drop_figure(out: Path, drop: dict) -> list[str]:
    rows = drop["per_neuron"]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(rows)), 4))
    x = np.arange(len(rows))
    ax.bar(x - 0.27, [r["base"] for r in rows], 0.27, color=COLORS["base"], label="base")
    ax.bar(x, [r["aligned_same_tokens"] for r in rows], 0.27, color=COLORS["aligned"], label="aligned, base tokens")
    ax.bar(x + 0.27, [r["aligned_own_tokens"] for r in rows], 0.27, color="#9ecae1", label="aligned, own tokens")
    ax.set_xticks(x)
    ax.set_xticklabels([f"L{r['layer']}.{r['neuron']}" for r in rows], rotation=60, fontsize=8)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylabel("mean activation m over 20 generated tokens")
    ax.set_title("Figure 2 — activations of the top toxic neurons, base vs aligned")
    ax.legend(fontsize=8)
    return _save(fig, out, "fig2_activation_drop")


def offset_figure(out: Path, offset: list[dict]) -> list[str]:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    layers = [o["layer"] for o in offset]
    ax.bar(layers, [o["relative_norm"] for o in offset], color="#7f7f7f")
    ax.set_xlabel("layer l")
    ax.set_ylabel("‖δx^l_mid‖ / ‖mean x_base‖")
    ax2 = ax.twinx()
    ax2.plot(layers, [o["cosine_with_probe"] for o in offset], "-o", color="#2ca02c")
    ax2.set_ylabel("cos(δx, probe)", color="#2ca02c")
    ax.set_title("Residual offset δx per layer (aligned − base, same tokens)")
    return _save(fig, out, "fig_offset_by_layer")


def projection_figure(out: Path, stats, layer: int, neuron: int, delta: torch.Tensor) -> list[str]:
    xb = stats[("base", "same")].per_prompt_x[layer]
    xa = stats[("aligned", "same")].per_prompt_x[layer]
    mb = stats[("base", "same")].per_prompt_m[layer][:, neuron]
    ma = stats[("aligned", "same")].per_prompt_m[layer][:, neuron]
    d = delta[layer] / delta[layer].norm().clamp(min=1e-30)
    both = torch.cat([xb, xa])
    centred = both - both.mean(0)
    centred = centred - (centred @ d)[:, None] * d  # PC1 of what δx does not explain
    pc1 = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    pb, pa = torch.stack([xb @ d, xb @ pc1], 1), torch.stack([xa @ d, xa @ pc1], 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    for i in range(len(pb)):
        ax.plot([pb[i, 0], pa[i, 0]], [pb[i, 1], pa[i, 1]], ":", color="grey", lw=0.5)
    for p, m, marker, label in ((pb, mb, "o", "base"), (pa, ma, "^", "aligned")):
        active = (m > 0).numpy()
        ax.scatter(p[active, 0], p[active, 1], marker=marker, color="#d62728", s=14,
                   label=f"{label}, L{layer}.{neuron} active")
        ax.scatter(p[~active, 0], p[~active, 1], marker=marker, color="#1f77b4", s=14,
                   label=f"{label}, inactive")
    ax.set_xlabel(f"projection on δx̂^{layer}_mid")
    ax.set_ylabel("projection on PC1")
    ax.set_title(f"Figure 4 — residuals at layer {layer} (dotted: same prompt)")
    ax.legend(fontsize=7)
    return _save(fig, out, f"fig4_projection_L{layer}")


def value_shift_figure(out: Path, layer: int, shifts: dict, base_mean_m: np.ndarray) -> list[str]:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.linspace(-1, 1, 41)
    cmap = plt.get_cmap("viridis")
    for j, c in shifts.items():
        hist, _ = np.histogram(c, bins=bins)
        ax1.plot((bins[:-1] + bins[1:]) / 2, hist / max(len(c), 1), color=cmap(j / max(layer, 1)), lw=1)
    ax1.set_xlabel(f"cos(Δv_i^j, δx^{layer}_mid)")
    ax1.set_ylabel("share of neurons in layer j")
    ax1.set_title(f"value-vector shifts of layers j < {layer} (colour: j, dark = early)")
    m = base_mean_m[:layer].ravel()
    ax2.hist(m, bins=60, color="#ff7f0e")
    ax2.set_yscale("log")
    ax2.set_xlabel("mean activation m_i (base model)")
    ax2.set_title(f"activations of the neurons of layers < {layer}")
    return _save(fig, out, f"fig5_value_shifts_L{layer}")


def analysis_figures(out: Path, lens, drop, offset, stats, fig_layers, top, delta, shifts, base_mean_m,
                     base_ref, aligned_ref) -> list[str]:
    files = []
    if lens.get("labels"):
        files += logit_lens_figure(out, lens, base_ref, aligned_ref)
    files += activation_drop_figure(out, drop)
    files += offset_figure(out, offset)
    for layer in fig_layers:
        neuron = next(n for l, n in top if l == layer)
        files += projection_figure(out, stats, layer, neuron, delta)
        if layer > 0:
            files += value_shift_figure(out, layer, shifts[layer], base_mean_m)
    return files


GROUP_COLORS = {"TP-": "#d62728", "TN+": "#ff7f0e", "AP+": "#1f77b4", "AN-": "#17becf",
                "TP+": "#f7b6d2", "TN-": "#ffbb78", "AP-": "#aec7e8", "AN+": "#9edae5", "": "#c7c7c7",
                "TP-/AN-": "#d62728", "TN+/AP+": "#1f77b4", "TP+/AN+": "#f7b6d2", "TN-/AP-": "#aec7e8"}


def neuron_figures(out: Path, t: dict, labels: np.ndarray, shares: dict) -> list[str]:
    """Per-layer contribution of each group, the cumulative share curve, Δm vs cosine."""
    files = []
    L = int(t["layer"].max()) + 1
    fig, ax = plt.subplots(figsize=(9, 4))
    bottom_pos, bottom_neg = np.zeros(L), np.zeros(L)
    for g in [g for g in GROUP_COLORS if g and (labels == g).any()]:
        per_layer = np.array([t["delta"][(labels == g) & (t["layer"] == l)].sum() for l in range(L)])
        base = np.where(per_layer >= 0, bottom_pos, bottom_neg)
        ax.bar(range(L), per_layer, bottom=base, color=GROUP_COLORS[g], label=g)
        bottom_pos += np.clip(per_layer, 0, None)
        bottom_neg += np.clip(per_layer, None, 0)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("reduction of the probe projection Δ")
    ax.set_title("Reduction of the toxicity projection by neuron group and layer")
    ax.legend(ncol=4, fontsize=7)
    files += _save(fig, out, "fig_groups_by_layer")

    d = np.sort(t["delta"][t["delta"] > 0])[::-1]
    fig, ax = plt.subplots(figsize=(6, 4))
    if len(d):
        ax.plot(np.arange(1, len(d) + 1), np.cumsum(d) / d.sum())
    ax.set_xscale("log")
    ax.set_xlabel("neurons, largest reduction first")
    ax.set_ylabel("cumulative share of the positive reduction")
    tn = shares["toxic_neurons"]
    ax.set_title(f"Cumulative share (toxic neurons: {100 * (tn['share_of_positive'] or 0):.1f}% of positive)")
    files += _save(fig, out, "fig_cumulative_share")

    fig, ax = plt.subplots(figsize=(6, 5))
    dm = t["ms_aligned"] - t["ms_base"]
    for g in ["", *(g for g in GROUP_COLORS if g and (labels == g).any())]:
        sel = labels == g
        ax.scatter(t["cosine"][sel], dm[sel], s=2, color=GROUP_COLORS[g], label=g or "none", alpha=0.6)
    ax.axhline(0, color="black", lw=0.5)
    ax.axvline(0, color="black", lw=0.5)
    ax.set_xlabel("cos(v_i, probe)")
    ax.set_ylabel("activation change (aligned − base)")
    ax.set_title("Neurons by cosine and activation change")
    ax.legend(markerscale=4, fontsize=7, ncol=3)
    files += _save(fig, out, "fig_neuron_scatter")
    return files


def retention_figure(out: Path, rows: list[dict]) -> list[str]:
    """Offset retention by layer, one line per transformation (aligned model)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in rows:
        if r["model"] == "aligned" and r["retention"]:
            ax.plot(range(len(r["retention"])), r["retention"], "-o", ms=3, label=r["transform"])
    ax.axhline(1, color="black", lw=0.5, ls=":")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("offset retention (1 = as on plain prompts)")
    ax.set_title("Does the aligned model still apply its offset δx?")
    ax.legend(fontsize=8)
    return _save(fig, out, "fig_retention")


def variant_offset_figure(out: Path, rows: list[dict]) -> list[str]:
    """‖δx‖/‖x‖ by layer, one line per alignment variant or method (alternatives stage)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in rows:
        if r.get("offset"):
            ax.plot([o["layer"] for o in r["offset"]], [o["relative_norm"] for o in r["offset"]], "-o", ms=3,
                    label=f"{r['variant']} ({r.get('method', '-')})")
    ax.set_xlabel("layer l")
    ax.set_ylabel("‖δx^l‖ / ‖mean x_base‖")
    ax.set_title("Residual offset δx per layer, each alignment against the same base (same tokens)")
    ax.legend(fontsize=8)
    return _save(fig, out, "fig_offset_by_variant")


def kl_profile_figure(out: Path, drift: dict[str, dict]) -> list[str]:
    """Per-token KL(aligned ‖ base) at each generated position, one line (with its 95% band) per aligned model."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, d in drift.items():
        rows = [r for r in d["kl_challenge"]["positions"] if r["ci95"]]
        x = [r["position"] for r in rows]
        ax.plot(x, [r["mean"] for r in rows], "-o", ms=3, label=label)
        ax.fill_between(x, [r["ci95"][0] for r in rows], [r["ci95"][1] for r in rows], alpha=0.2)
    ax.set_xlabel("generated position")
    ax.set_ylabel("KL(aligned ‖ base), nats")
    ax.set_title("Where the alignment acts: per-token KL on the challenge prompts")
    ax.legend(fontsize=8)
    return _save(fig, out, "fig_kl_profile")


def interval_bars(ax, x: list[float], cis: list, color=None) -> None:
    """A vertical line from each interval's lower to its upper bound (none where missing or not finite). Not
    errorbar's offsets from the point: a bootstrap percentile interval need not contain the point (e.g. a
    ratio of means, or the smallest of several shares), and errorbar refuses a negative offset."""
    pts = [(xi, ci) for xi, ci in zip(x, cis) if ci and all(v is not None and np.isfinite(v) for v in ci)]
    if pts:
        ax.vlines([p[0] for p in pts], [p[1][0] for p in pts], [p[1][1] for p in pts], colors=color or "C0", lw=1)


def dose_response_figure(out: Path, rows: list[dict]) -> list[str]:
    """One panel per measure: its value and 95% interval against the alignment's toxicity reduction."""
    names = sorted({k for r in rows for k in r["measures"]})
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        pts = sorted(((r["reduction"], r["measures"][name]) for r in rows if name in r["measures"]), key=lambda p: p[0])
        x = [p[0] for p in pts]
        ax.plot(x, [p[1]["value"] for p in pts], "-o", ms=3)
        interval_bars(ax, x, [p[1]["ci95"] for p in pts])
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("toxicity reduction")
    fig.tight_layout()
    return _save(fig, out, "fig_dose_response")


def claims_dose_figure(out: Path, claims: list[dict]) -> list[str]:
    """One small panel per ledger claim: its effect and 95% interval at each strength of the alignment (x: the
    toxicity reduction on the evaluation prompts), coloured by verdict; the title says when the verdict flips."""
    colors = {"holds": "#2ca02c", "contradicted": "#d62728", "inconclusive": "#7f7f7f", "precondition failed": "#ff7f0e"}
    n = len(claims)
    cols = 4
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.3 * cols, 2.4 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, c in zip(axes.flat, claims):
        pts = [a for a in c["at"] if a["reduction"] is not None and a["effect"] is not None]
        for a in pts:
            ax.plot([a["reduction"]], [a["effect"]], "o", ms=4, color=colors.get(a["verdict"], "black"))
            interval_bars(ax, [a["reduction"]], [a["ci95"]], color=colors.get(a["verdict"], "black"))
        ax.plot([a["reduction"] for a in pts], [a["effect"] for a in pts], lw=0.6, color="black")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(c["id"] + (" (flips)" if c["flips"] else ""), fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.supxlabel("toxicity reduction of the aligned model (evaluation prompts)", fontsize=8)
    fig.tight_layout()
    return _save(fig, out, "fig_dose_response_claims")

"""Neuron-level attribution shared by the stages (Yang et al., method.md section 6): each neuron's
share of the reduction in the residual's projection on the probe between a base and an aligned
model, and its group. `dpolens.stages.neurons` explains the groups; `dpolens.stages.alternatives` applies the same
accounting to every alignment variant or method.
"""

from __future__ import annotations

import numpy as np
import torch

from dpolens.activations import continuation_stats
from dpolens.compare import GROUPS
from dpolens.directions import all_value_vectors
from dpolens.model.generation import generate
from dpolens.model.loading import LoadedModel

MIRRORS = ("TP+", "TN-", "AP-", "AN+")


@torch.inference_mode()
def neuron_table(base: LoadedModel, aligned: LoadedModel, probe: torch.Tensor, prompts: list[str],
                 batch_size: int = 32, max_new_tokens: int = 20, progress: bool = True) -> dict[str, np.ndarray]:
    """Per-neuron arrays [n_layers * d_mlp]: layer, neuron, cosine, m, m/s, p for both models; and
    per prompt, `prompt_p_*` [n_prompts, n_layers * d_mlp], the sums over the prompt's continuation
    tokens of each neuron's projection (m/s)·(v·ŵ), and `prompt_tokens_*` [n_prompts]."""
    a = base.adapter
    w_hat = probe.float() / probe.float().norm()
    out = {}
    for name, lm in (("base", base), ("aligned", aligned)):
        gens = generate(lm, prompts, max_new_tokens, batch_size=batch_size, progress=progress,
                        desc=f"generate {name}")
        st = continuation_stats(lm, [(g.prompt_ids, g.continuation_ids) for g in gens], (),
                                batch_size, f"neurons {name}", progress, per_prompt_ms=True)
        values = all_value_vectors(lm)  # [L, d_mlp, d_model]
        vw = values @ w_hat  # [L, d_mlp]
        out[f"m_{name}"] = st.mean_m.flatten().numpy()
        out[f"ms_{name}"] = st.mean_m_over_s.flatten().numpy()
        out[f"p_{name}"] = (st.mean_m_over_s * vw).flatten().numpy()
        out[f"prompt_p_{name}"] = (st.per_prompt_ms * vw).flatten(1).numpy()
        out[f"prompt_tokens_{name}"] = st.prompt_tokens.double().numpy()
        if name == "base":
            out["cosine"] = (vw / values.norm(dim=-1).clamp(min=1e-30)).flatten().numpy()
            out["n_tokens_base"] = st.count
    L, d = a.n_layers, a.d_mlp
    out["layer"] = np.repeat(np.arange(L), d)
    out["neuron"] = np.tile(np.arange(d), L)
    out["delta"] = out["p_base"] - out["p_aligned"]
    return out


def assign_groups(t: dict[str, np.ndarray]) -> np.ndarray:
    """Group label per neuron ('' when the cosine or Δ_i is exactly zero).

    Letters: sign of cos(v, w) in the base model (T > 0, A < 0) and of the base activation
    (P >= 0, N < 0). Neurons that reduce the projection (Δ_i > 0) form TP−, TN+, AP+, AN−, whose
    +/- names the expected change of the activation's magnitude; those with Δ_i < 0 form the
    mirrors TP+, TN−, AP−, AN+. `agreement` in groups.json says how often the activation did move
    as the name says (Δ_i also carries the aligned model's own small value-vector change)."""
    cos, m, delta = t["cosine"], t["ms_base"], t["delta"]
    labels = np.full(len(cos), "", dtype=object)
    names = {("T", "P", True): "TP-", ("T", "N", True): "TN+", ("A", "P", True): "AP+", ("A", "N", True): "AN-",
             ("T", "P", False): "TP+", ("T", "N", False): "TN-", ("A", "P", False): "AP-", ("A", "N", False): "AN+"}
    for tox, cos_ok in (("T", cos > 0), ("A", cos < 0)):
        for sign, m_ok in (("P", m >= 0), ("N", m < 0)):
            for reduces, d_ok in ((True, delta > 0), (False, delta < 0)):
                labels[cos_ok & m_ok & d_ok] = names[(tox, sign, reduces)]
    return labels


def _agreement(t, labels: np.ndarray, g: str) -> float | None:
    sel = labels == g
    if not sel.any():
        return None
    dm = (t["ms_aligned"] - t["ms_base"])[sel]
    grows = dm > 0 if g[1] == "P" else dm < 0
    return float(np.mean(grows if g[2] == "+" else ~grows))


def dampened_toxic(t: dict[str, np.ndarray], top_toxic: int) -> np.ndarray:
    """Indices of the top `top_toxic` neurons by cosine that were active (m̄_base > 0) and dampened."""
    top = np.argsort(-t["cosine"])[:top_toxic]
    return top[(t["ms_base"][top] > 0) & (t["ms_aligned"][top] < t["ms_base"][top])]


def group_shares(t: dict[str, np.ndarray], labels: np.ndarray, top_toxic: int) -> dict:
    delta = t["delta"]
    positive, net = float(delta[delta > 0].sum()), float(delta.sum())
    groups = {}
    for g in GROUPS + MIRRORS:
        sel = labels == g
        red = float(delta[sel].sum())
        groups[g] = {"count": int(sel.sum()), "reduction": red, "share_of_positive": red / positive if positive else None,
                     "share_of_net": red / net if net else None, "reduces_toxicity": g in GROUPS,
                     "agreement": _agreement(t, labels, g)}
    dampened = dampened_toxic(t, top_toxic)
    tox_red = float(delta[dampened].sum())
    return {"groups": groups, "totals": {"positive": positive, "net": net},
            "four_groups_share_of_positive": sum(groups[g]["reduction"] for g in GROUPS) / positive if positive else None,
            "toxic_neurons": {"count": int(len(dampened)), "top_n": top_toxic, "reduction": tox_red,
                              "share_of_positive": tox_red / positive if positive else None,
                              "share_of_net": tox_red / net if net else None,
                              "definition": f"top {top_toxic} by cos(v, probe) that were active (m̄_base > 0) "
                                            "and dampened by alignment"}}


def neuron_edits(t, sel: np.ndarray, values: np.ndarray, how: str = "value") -> list[dict]:
    """Intervention spec setting (`value`) or shifting (`shift`) the selected neurons by `values`,
    one edit per layer."""
    edits = []
    for layer in np.unique(t["layer"][sel]):
        idx = np.where(sel & (t["layer"] == layer))[0]
        edits.append({"kind": "neurons", "layer": int(layer), "neurons": t["neuron"][idx].tolist(),
                      how: values[idx].tolist()})
    return edits

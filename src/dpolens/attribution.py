"""Neuron-level attribution shared by the stages (Yang et al., method.md section 6): each neuron's
share of the reduction in the residual's projection on the probe between a base and an aligned
model, and its group. `dpolens.stages.neurons` explains the groups; `dpolens.stages.alternatives` applies the same
accounting to every alignment variant or method.
"""

from __future__ import annotations

import numpy as np
import torch

from dpolens import memo
from dpolens.compare import GROUPS
from dpolens.directions import all_value_vectors, rank_by_probe, read_direction, toxic_scores
from dpolens.model.loading import LoadedModel

MIRRORS = ("TP+", "TN-", "AP-", "AN+")
# gated MLPs (Gemma, Llama): flipping a neuron's up row and down column changes nothing in the model but swaps
# TP− with AN− and TN+ with AP+, so only their unions are properties of the model: a neuron whose base
# contribution along the probe (m/s)(v·ŵ) is positive (pushes toward toxic) or negative, and whose contribution
# fell (Δ > 0) or rose
GATED_GROUPS = ("TP-/AN-", "TN+/AP+")
GATED_MIRRORS = ("TP+/AN+", "TN-/AP-")


def group_names(gated: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the groups that reduce the projection, their mirrors) for a GELU (four) or a gated (two) MLP."""
    return (GATED_GROUPS, GATED_MIRRORS) if gated else (GROUPS, MIRRORS)


@torch.inference_mode()
def neuron_table(base: LoadedModel, aligned: LoadedModel, probe: torch.Tensor, prompts: list[str],
                 batch_size: int = 32, max_new_tokens: int = 20, progress: bool = True, *,
                 meta: dict | None = None, space: str = "raw", base_from: dict | None = None,
                 head_screen: bool | str = "auto", cache: str | None = None) -> dict[str, np.ndarray]:
    """Per-neuron arrays [n_layers * d_mlp]: layer, neuron, cosine, toxic_score, m, m/s, p for both
    models; and per prompt, `prompt_p_*` [n_prompts, n_layers * d_mlp], the sums over the prompt's
    continuation tokens of each neuron's projection (m/s)·(v·ŵ), and `prompt_tokens_*` [n_prompts].

    ŵ is the direction the probe reads (`directions.read_direction`: γ ⊙ w in `space: standardized`,
    w in `raw`), v the value vector after post-MLP norms and m/s its activation as it reaches the
    residual; `cosine` is cos(v, probe) in `space` (its sign is that of v·ŵ) and `toxic_score` the
    ranking every stage uses (`directions.toxic_scores`, which needs the probe's `meta`). `base_from`: a
    table of the same base, probe and prompts whose base half is reused (a placebo beside the aligned model).
    `cache`: a folder where the base model's continuations and statistics are kept and read back (`dpolens.memo`)."""
    a = base.adapter
    w_hat = read_direction(base, probe, space)
    out = {}
    for name, lm in (("base", base), ("aligned", aligned)):
        if name == "base" and base_from is not None:
            out.update({k: v for k, v in base_from.items() if k.endswith("_base") or k in ("cosine", "toxic_score")})
            continue
        kept = cache if name == "base" else None
        gens = memo.generations(kept, lm, prompts, max_new_tokens, batch_size=batch_size, progress=progress,
                                head_screen=head_screen, desc=f"generate {name}")
        st = memo.stats(kept, lm, [(g.prompt_ids, g.continuation_ids) for g in gens], (),
                        batch_size, f"neurons {name}", progress, per_prompt_ms=True)
        values = all_value_vectors(lm)  # [L, d_mlp, d_model]
        vw = values @ w_hat  # [L, d_mlp]
        out[f"m_{name}"] = st.mean_m.flatten().numpy()
        out[f"ms_{name}"] = st.mean_m_over_s.flatten().numpy()
        out[f"p_{name}"] = (st.mean_m_over_s * vw).flatten().numpy()
        out[f"prompt_p_{name}"] = (st.per_prompt_ms * vw).flatten(1).numpy()
        out[f"prompt_tokens_{name}"] = st.prompt_tokens.double().numpy()
        out[f"vw_{name}"] = vw.flatten().numpy()  # v·ŵ with the model's own value vectors
        if name == "base":
            out["cosine"] = rank_by_probe(lm, probe, space, (meta or {}).get("feature_std")).flatten().numpy()
            if meta is not None:
                out["toxic_score"] = toxic_scores(lm, probe, meta, space).flatten().numpy()
            out["n_tokens_base"] = st.count
    L, d = a.n_layers, a.d_mlp
    out["layer"] = np.repeat(np.arange(L), d)
    out["neuron"] = np.tile(np.arange(d), L)
    out["delta"] = out["p_base"] - out["p_aligned"]
    return out


def assign_groups(t: dict[str, np.ndarray], gated: bool = False) -> np.ndarray:
    """Group label per neuron ('' when the cosine or Δ_i is exactly zero).

    Letters: sign of cos(v, w) in the base model (T > 0, A < 0) and of the base activation
    (P >= 0, N < 0). Neurons that reduce the projection (Δ_i > 0) form TP−, TN+, AP+, AN−, whose
    +/- names the expected change of the activation's magnitude; those with Δ_i < 0 form the
    mirrors TP+, TN−, AP−, AN+. `agreement` in groups.json says how often the activation did move
    as the name says (Δ_i also carries the aligned model's own small value-vector change)."""
    cos, m, delta = t["cosine"], t["ms_base"], t["delta"]
    labels = np.full(len(cos), "", dtype=object)
    if gated:  # sign-invariant: by the sign of the base contribution cos·m (that of (m/s)(v·ŵ)) and of Δ
        c = np.sign(cos) * np.sign(m)
        for name, sel in ((GATED_GROUPS[0], (c > 0) & (delta > 0)), (GATED_GROUPS[1], (c < 0) & (delta > 0)),
                          (GATED_MIRRORS[0], (c > 0) & (delta < 0)), (GATED_MIRRORS[1], (c < 0) & (delta < 0))):
            labels[sel] = name
        return labels
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
    if "/" in g:  # gated: did the contribution's magnitude along its base sign move as the name says?
        along = (t["ms_aligned"] * np.sign(t["ms_base"]))[sel]
        grows = along > np.abs(t["ms_base"][sel])
        return float(np.mean(grows if g in ("TN+/AP+", "TP+/AN+") else ~grows))
    dm = (t["ms_aligned"] - t["ms_base"])[sel]
    grows = dm > 0 if g[1] == "P" else dm < 0
    return float(np.mean(grows if g[2] == "+" else ~grows))


def set_sums(per_prompt: np.ndarray, member: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Per prompt, the sums of each neuron set's projections: [n_prompts, n_neurons] @ [n_neurons, n_sets]
    in float64, 256 prompts at a time (`rows`: only those prompts)."""
    pp = per_prompt if rows is None else per_prompt[rows]
    return np.concatenate([pp[i:i + 256].astype(np.float64) @ member for i in range(0, len(pp), 256)])


def dampened_toxic(t: dict[str, np.ndarray], top_toxic: int, gated: bool = False) -> np.ndarray:
    """Indices of the top `top_toxic` neurons by the shared ranking `toxic_score` (directions.toxic_scores; by
    the cosine where the table lacks it) that were active (m̄_base > 0) and dampened. Gated: the ranking
    is cos(v, ŵ) times the neuron's sign from the probe's toxic texts (without it, sign(m̄_base)): the
    direction the neuron writes when it fires, which a sign flip of its up row and down column leaves
    alone; dampened along its base sign."""
    score = t.get("toxic_score")  # the shared ranking (directions.toxic_scores), where the table has it
    if not gated:
        top = np.argsort(-(t["cosine"] if score is None else score), kind="stable")[:top_toxic]
        return top[(t["ms_base"][top] > 0) & (t["ms_aligned"][top] < t["ms_base"][top])]
    sign = np.sign(t["ms_base"])
    top = np.argsort(-(t["cosine"] * sign if score is None else score), kind="stable")[:top_toxic]
    return top[(sign[top] != 0) & (t["ms_aligned"][top] * sign[top] < np.abs(t["ms_base"][top]))]


def group_shares(t: dict[str, np.ndarray], labels: np.ndarray, top_toxic: int, gated: bool = False) -> dict:
    delta = t["delta"]
    positive, net = float(delta[delta > 0].sum()), float(delta.sum())
    groups = {}
    reducing, mirrors = group_names(gated)
    for g in reducing + mirrors:
        sel = labels == g
        red = float(delta[sel].sum())
        groups[g] = {"count": int(sel.sum()), "reduction": red, "share_of_positive": red / positive if positive else None,
                     "share_of_net": red / net if net else None, "reduces_toxicity": g in reducing,
                     "agreement": _agreement(t, labels, g)}
    dampened = dampened_toxic(t, top_toxic, gated)
    tox_red = float(delta[dampened].sum())
    return {"groups": groups, "totals": {"positive": positive, "net": net}, "mlp": "gated" if gated else "gelu",
            "group_definition": GROUP_DEFINITION["gated" if gated else "gelu"],
            "four_groups_share_of_positive": sum(groups[g]["reduction"] for g in reducing) / positive if positive else None,
            "toxic_neurons": {"count": int(len(dampened)), "top_n": top_toxic, "reduction": tox_red,
                              "share_of_positive": tox_red / positive if positive else None,
                              "share_of_net": tox_red / net if net else None,
                              "definition": (f"top {top_toxic} by cos(v, probe)·sign (the neuron's sign from the "
                                             "probe's toxic texts, directions.toxic_scores; sign(m̄_base) where the "
                                             "table has no toxic_score), dampened along their base sign" if gated
                                             else f"top {top_toxic} by cos(v, probe) that were active (m̄_base > 0) "
                                             "and dampened by alignment")}}


GROUP_DEFINITION = {
    "gelu": "Yang et al.'s four groups: sign of cos(v, ŵ) (T > 0, A < 0) and of the base activation (P >= 0, N < 0), "
            "among the neurons whose projection fell (Δ > 0)",
    "gated": "a gated MLP's activation sign is a convention (flipping a neuron's up row and down column changes "
             "nothing but swaps TP− with AN− and TN+ with AP+), so the four groups are two: TP−/AN−, a contribution "
             "toward the probe ((m/s)(v·ŵ) > 0) that fell, and TN+/AP+, a contribution away from it that grew"}


def neuron_edits(t, sel: np.ndarray, values: np.ndarray, how: str = "value") -> list[dict]:
    """Intervention spec setting (`value`) or shifting (`shift`) the selected neurons by `values`,
    one edit per layer."""
    edits = []
    for layer in np.unique(t["layer"][sel]):
        idx = np.where(sel & (t["layer"] == layer))[0]
        edits.append({"kind": "neurons", "layer": int(layer), "neurons": t["neuron"][idx].tolist(),
                      how: values[idx].tolist()})
    return edits


def crossfit_shares(t: dict[str, np.ndarray], top_toxic: int, n_boot: int = 2000, seed: int = 0,
                    gated: bool = False, n_random: int = 20, replicates: bool = False) -> dict:
    """Cross-fitted group shares: the four groups and the dampened toxic neurons are chosen on one half
    of the prompts (a seeded split) from that half's mean activations and projections, and their
    reductions are measured on the other half, with a bootstrap over its prompts. A share is of the
    reduction the four chosen groups together carry on the measuring half; the smallest of the four
    shares is taken inside each replicate, so its interval is the interval of the minimum.

    Chosen and measured on the same prompts, every group's share is positive by construction (each
    neuron is put in a group because its reduction there was positive), even for two models that
    differ only by noise; chosen on other prompts, a group's share is positive only where its
    neurons reduce the projection again. `n_random` random neuron sets of the toxic set's size are the null:
    their mean share beside the toxic neurons', and the difference, in the same replicates."""
    from dpolens.evaluate import percentile_ci
    from dpolens.activations import bootstrap_counts

    pb, pa = t["prompt_p_base"], t["prompt_p_aligned"]
    tb, ta = t["prompt_tokens_base"], t["prompt_tokens_aligned"]
    n = len(tb)
    if n < 4:
        return {"note": f"{n} prompts: too few to split"}
    order = np.random.default_rng(seed).permutation(n)
    choose, measure = np.sort(order[: n // 2]), np.sort(order[n // 2:])

    def per_neuron(p, tok, rows):
        return p[rows].sum(0, dtype=np.float64) / max(float(tok[rows].sum()), 1.0)

    p_b, p_a = per_neuron(pb, tb, choose), per_neuron(pa, ta, choose)
    with np.errstate(divide="ignore", invalid="ignore"):
        ms_b = np.where(t["vw_base"] != 0, p_b / t["vw_base"], 0.0)
        ms_a = np.where(t["vw_aligned"] != 0, p_a / t["vw_aligned"], 0.0)
    labels = assign_groups({"cosine": t["cosine"], "ms_base": ms_b, "delta": p_b - p_a}, gated)
    toxic = np.zeros(len(labels), dtype=bool)
    toxic[dampened_toxic({"cosine": t["cosine"], "ms_base": ms_b, "ms_aligned": ms_a,
                          **({"toxic_score": t["toxic_score"]} if "toxic_score" in t else {})}, top_toxic, gated)] = True
    groups = group_names(gated)[0]
    sets = {**{g: labels == g for g in groups}, "toxic_neurons": toxic, "four_groups": np.isin(labels, groups)}
    rng = np.random.default_rng(seed + 1)
    for i in range(n_random if toxic.any() else 0):  # the null: random sets of the toxic set's size
        member = np.zeros(len(labels), dtype=bool)
        member[rng.choice(len(labels), int(toxic.sum()), replace=False)] = True
        sets[f"random_{i}"] = member
    member = np.stack(list(sets.values()), 1).astype(np.float64)
    sb, sa = set_sums(pb, member, measure), set_sums(pa, member, measure)
    tok_b, tok_a = tb[measure], ta[measure]

    def reductions(counts):  # [k, n_measure] -> [k, n_sets]
        return counts @ sb / (counts @ tok_b)[:, None] - counts @ sa / (counts @ tok_a)[:, None]

    point = reductions(np.ones((1, len(measure))))[0]
    reps = np.concatenate(list(reductions(c) for c in bootstrap_counts(len(measure), n_boot, seed)))
    col = {k: i for i, k in enumerate(sets)}
    with np.errstate(divide="ignore", invalid="ignore"):
        share = lambda r, k: r[..., col[k]] / r[..., col["four_groups"]]
        smallest = np.min(np.stack([share(reps, g) for g in groups]), axis=0)
        out = {g: {"count": int(sets[g].sum()), "share": _finite(share(point, g)),
                   "ci95": percentile_ci(share(reps, g))} for g in groups}
        point_shares = {g: out[g]["share"] for g in groups}
        randoms = [k for k in sets if k.startswith("random_")]
        rand_rep = np.mean([share(reps, k) for k in randoms], axis=0) if randoms else None
        random_block = {"n_sets": len(randoms), "count": int(toxic.sum()),
                        "share": _finite(np.mean([share(point, k) for k in randoms])),
                        "ci95": percentile_ci(rand_rep),
                        "toxic_minus_random": {"diff": _finite(share(point, "toxic_neurons") -
                                                               np.mean([share(point, k) for k in randoms])),
                                               "ci95": percentile_ci(share(reps, "toxic_neurons") - rand_rep)}
                        } if randoms else None
        low = min(groups, key=lambda g: point_shares[g] if point_shares[g] is not None else np.inf)
        # the smallest group's own reduction (no ratio): defined where the groups together reduce nothing, as a
        # placebo's do, so it is what a placebo comparison of "the reduction spreads" reads
        least = np.min(reps[:, [col[g] for g in groups]], axis=1)
        toxic_half = reps[:, col["toxic_neurons"]] - 0.5 * reps[:, col["four_groups"]]
        return {"groups": out, "mlp": "gated" if gated else "gelu",
                "min": {"group": low, "share": _finite(min(share(point, g) for g in groups)),
                        "ci95": percentile_ci(smallest),
                        "reduction": float(min(point[col[g]] for g in groups)),
                        "reduction_ci95": percentile_ci(least)},
                "toxic_neurons": {"count": int(toxic.sum()), "share": _finite(share(point, "toxic_neurons")),
                                  "ci95": percentile_ci(share(reps, "toxic_neurons")), "random_sets": random_block,
                                  # the toxic neurons' reduction minus half the four groups' = (share − 0.5) × the
                                  # four groups' reduction (no ratio): < 0 exactly where the share is below one half
                                  # of a positive reduction, ~0 where the groups reduce ~0, as a placebo's do, so it
                                  # is what a placebo comparison of "a small share" reads
                                  "minus_half_four_groups": float(point[col["toxic_neurons"]]
                                                                  - 0.5 * point[col["four_groups"]]),
                                  "minus_half_four_groups_ci95": percentile_ci(toxic_half)},
                "four_groups_reduction": {"value": float(point[col["four_groups"]]),
                                          "ci95": percentile_ci(reps[:, col["four_groups"]])},
                "split": {"choose": int(len(choose)), "measure": int(len(measure)), "seed": seed, "n_boot": n_boot},
                # `replicates`: per replicate (numpy, not for JSON), what a placebo comparison pairs
                **({"_replicates": {"toxic_neurons": share(reps, "toxic_neurons"), "min": smallest,
                                    "min_reduction": least, "toxic_minus_half": toxic_half}}
                   if replicates else {}),
                "rule": "groups and dampened toxic neurons chosen on one half of the fit prompts, reductions "
                        "measured on the other half (token-weighted); shares of the four chosen groups' joint "
                        "reduction there; bootstrap over the measuring half, the minimum taken in each replicate"}


def _finite(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None

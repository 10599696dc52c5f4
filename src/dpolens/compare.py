"""Comparing a base model with its aligned version: how far each weight moved, whether two models
can be compared at all, and the residual offset between their streams (paper 4-5, method.md 5).
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import torch

from dpolens.activations import Stats, bootstrap_counts, bootstrap_sum
from dpolens.artifacts import DpolensError
from dpolens.evaluate import percentile_ci
from dpolens.model.loading import LoadedModel

# Yang et al.'s four neuron groups whose activation change lowers the probe projection (the names are
# explained in dpolens.stages.neurons, the stage that assigns them)
GROUPS = ("TP-", "TN+", "AP+", "AN-")


class TensorShift(TypedDict):
    name: str  # parameter name
    cosine: float  # cos(base, aligned), both flattened
    norm_diff: float  # ‖aligned − base‖
    rel_diff: float  # norm_diff / ‖base‖
    numel: int


class WeightShiftTotals(TypedDict):
    """Over all parameter tensors (what alternatives keeps per variant)."""

    min_cosine: float
    mean_norm_diff: float
    max_norm_diff: float
    all_above_0_99: bool  # every tensor's cosine > 0.99
    n_tensors: int
    changed_tensors: int  # tensors with norm_diff > 0


class WeightShiftSummary(WeightShiftTotals):
    """`weight_shift` without `per_tensor`: what dpo's and analysis' summaries keep."""

    most_moved: list[TensorShift]  # the `top` tensors with the largest rel_diff


class WeightShift(WeightShiftSummary):
    per_tensor: list[TensorShift]


class OffsetLayer(TypedDict):
    """One layer of the residual offset δx (mean resid_mid, aligned − base, same tokens)."""

    layer: int
    norm: float  # ‖δx_l‖
    relative_norm: float  # ‖δx_l‖ / ‖mean x_base,l‖
    cosine_with_probe: float  # cos(δx_l, probe)


def weight_shift(base: torch.nn.Module, aligned: torch.nn.Module, top: int = 10) -> WeightShift:
    """Per parameter tensor: cosine(base, aligned) and ‖aligned − base‖, with a summary."""
    b, a = dict(base.named_parameters()), dict(aligned.named_parameters())
    if b.keys() != a.keys() or any(b[k].shape != a[k].shape for k in b):
        raise DpolensError("base and aligned models have different parameters or shapes")
    rows = []
    for name in b:
        x, y = b[name].detach().double().flatten(), a[name].detach().double().flatten()
        diff = (y - x).norm().item()
        denom = (x.norm() * y.norm()).item()
        cos = (x @ y).item() / denom if denom > 0 else 1.0
        rows.append({"name": name, "cosine": cos, "norm_diff": diff, "rel_diff": diff / max(x.norm().item(), 1e-30),
                     "numel": x.numel()})
    moved = sorted(rows, key=lambda r: -r["rel_diff"])[:top]
    return {"min_cosine": min(r["cosine"] for r in rows),
            "mean_norm_diff": sum(r["norm_diff"] for r in rows) / len(rows),
            "max_norm_diff": max(r["norm_diff"] for r in rows),
            "all_above_0_99": all(r["cosine"] > 0.99 for r in rows),
            "n_tensors": len(rows), "changed_tensors": sum(r["norm_diff"] > 0 for r in rows),
            "most_moved": moved, "per_tensor": rows}


def placebo(base: LoadedModel, aligned: LoadedModel, seed: int = 0) -> LoadedModel:
    """The control alignment: the base plus seeded Gaussian noise with, per parameter tensor, the same
    Frobenius norm as the aligned model's change ‖W_aligned − W_base‖ (tensors the alignment left
    unchanged stay unchanged; tied tensors are one parameter). Any statistic that holds for it says
    nothing about the alignment."""
    import copy

    g = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(base.model)
    moved = dict(aligned.model.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            diff = (moved[name].detach().double() - p.detach().double()).norm()
            if diff == 0:
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.add_((noise * (diff / noise.norm())).to(p.dtype).to(p.device))
    return LoadedModel(model=model, tokenizer=base.tokenizer, ref=f"placebo({aligned.ref}, seed {seed})",
                       source="placebo")


def check_pair(base: LoadedModel, aligned: LoadedModel) -> None:
    a, b = base.adapter.describe(), aligned.adapter.describe()
    keys = ("model_type", "n_layers", "d_model", "d_mlp", "vocab_size")
    if any(a[k] != b[k] for k in keys):
        raise DpolensError("base and aligned models differ in architecture: "
                           + ", ".join(f"{k} {a[k]} vs {b[k]}" for k in keys if a[k] != b[k]))


def residual_offset(x_base: torch.Tensor, x_aligned: torch.Tensor, w_hat: torch.Tensor) -> list[OffsetLayer]:
    """Per layer, δx = mean resid_mid (aligned − base, same tokens): norm, norm relative to the base
    residual, cosine with the probe direction. x_*: [n_layers, d_model]."""
    delta = x_aligned - x_base
    return [{"layer": l, "norm": float(delta[l].norm()), "relative_norm": float(delta[l].norm() / x_base[l].norm()),
             "cosine_with_probe": float(delta[l] @ w_hat / delta[l].norm().clamp(min=1e-30))}
            for l in range(len(delta))]


class Estimate(TypedDict):
    mean: float
    ci95: list[float]  # bootstrap over prompts
    n: int  # prompts with continuation tokens


class OffsetStats(TypedDict):
    slope: Estimate | None  # least-squares slope of ‖δx_l‖/‖x_l‖ over layers; None: no prompt had tokens
    final_cosine_with_probe: Estimate | None  # cos(δx at the last layer, probe)
    unit: str  # "prompts"
    layers: int


def draw_mean(reps: np.ndarray, seed: int) -> np.ndarray:
    """Replicates of a control drawn at random ([K, n_boot] -> [n_boot]): each replicate takes one of
    the K control draws (seeded), so that an interval covers the spread between placebos as well as
    the units' sampling noise. One placebo differs significantly from another on the same prompts:
    an alignment is different from the placebo only where it is outside what any draw gives."""
    k, n = reps.shape
    pick = np.random.default_rng(seed + 7919).integers(0, k, size=n)
    return reps[pick, np.arange(n)]


def vs_placebos(aligned_point: float, aligned_reps: np.ndarray, control_points, control_reps: np.ndarray
                ) -> tuple[float, list[float]]:
    """aligned − the mean of K placebo draws, with a 95% prediction interval for the difference from a
    new draw: t(K−1) × sqrt(between-draw variance × (1 + 1/K) + the sampling variance of aligned − mean
    draw over the bootstrap replicates). Two placebos differ significantly on the same prompts, so an
    alignment is told apart from the placebo only where it is outside what another draw would give (a
    single control, K = 1, has no between-draw spread: sampling only)."""
    from scipy.stats import t as student_t

    c = np.asarray(control_points, dtype=np.float64)
    k = len(c)
    diff = float(aligned_point - c.mean())
    ctl = np.asarray(control_reps, dtype=np.float64).reshape(k, -1)
    samp = np.asarray(aligned_reps, dtype=np.float64) - ctl.mean(0)
    samp = samp[np.isfinite(samp)]
    if k < 2:
        lo, hi = percentile_ci(samp - samp.mean() + diff) if len(samp) else (float("nan"), float("nan"))
        return diff, [lo, hi]
    spread = c.var(ddof=1) * (1 + 1 / k) + (samp.var() if len(samp) else 0.0)
    half = float(student_t.ppf(0.975, k - 1) * np.sqrt(spread))
    return diff, [diff - half, diff + half]


def offset_stats(base: Stats, aligned: Stats, w_hat: torch.Tensor, offset: list[OffsetLayer], n_boot: int = 2000,
                 seed: int = 0, controls: list[Stats] = ()) -> OffsetStats:
    """Intervals over prompts for the offset's growth (least-squares slope over layers of
    ‖δx_l‖/‖x_l‖) and for cos(δx at the last layer, probe). Point values: those of `offset`
    (token-weighted over all prompts). Each replicate recomputes both from resampled prompts'
    mean resid_mid, weighted by their continuation tokens, as the point values are. With `controls`
    (placebos' stats on the same tokens), the same for their mean offset statistic and the paired
    difference aligned − control (`vs_control`: the same resamples of the prompts, and of the
    control draws, `draw_mean`), with `vs_placebos`' interval."""
    L = len(offset)
    keep = base.prompt_tokens > 0
    tok = base.prompt_tokens[keep].double()  # [n]
    n, d_model = len(tok), base.x_sum.shape[-1]
    if n == 0:  # no prompt has a continuation: nothing to resample
        return {"slope": None, "final_cosine_with_probe": None, "unit": "prompts", "layers": L}

    def prompt_sums(st: Stats) -> torch.Tensor:  # [n, L * d_model] per-prompt sums of resid_mid over tokens
        return (torch.stack([st.per_prompt_x[l][keep] for l in range(L)], 1).double() * tok[:, None, None]).reshape(n, -1)

    sum_x = prompt_sums(base)
    sums_d = {"aligned": (prompt_sums(aligned) - sum_x).numpy()}
    for i, c in enumerate(controls):
        sums_d[i] = (prompt_sums(c) - sum_x).numpy()
    sum_x, tokens = sum_x.numpy(), tok.numpy()
    layers = np.arange(L) - (L - 1) / 2
    w = w_hat.double().numpy()
    slopes, cosines = {k: [] for k in sums_d}, {k: [] for k in sums_d}

    def both(mean_x, mean_d):  # [k, L, d_model] -> slope [k], final cosine [k]
        rel = np.linalg.norm(mean_d, axis=-1) / np.linalg.norm(mean_x, axis=-1)  # [k, L]
        return rel @ layers / (layers @ layers), mean_d[:, -1] @ w / np.linalg.norm(mean_d[:, -1], axis=-1)

    for counts in bootstrap_counts(n, n_boot, seed, chunk=100):  # [k, n]
        boot_tokens = (counts @ tokens)[:, None, None]  # [k, 1, 1]
        mean_x = (counts @ sum_x).reshape(-1, L, d_model) / boot_tokens  # [k, L, d_model]
        for k, sum_d in sums_d.items():
            s, c = both(mean_x, (counts @ sum_d).reshape(-1, L, d_model) / boot_tokens)
            slopes[k].append(s)
            cosines[k].append(c)
    rel_point = np.array([o["relative_norm"] for o in offset])
    out = {"slope": {"mean": float(rel_point @ layers / (layers @ layers)),
                     "ci95": percentile_ci(np.concatenate(slopes["aligned"])), "n": int(n)},
           "final_cosine_with_probe": {"mean": offset[-1]["cosine_with_probe"],
                                       "ci95": percentile_ci(np.concatenate(cosines["aligned"])), "n": int(n)},
           "unit": "prompts", "layers": L}
    if controls:
        ones = np.ones((1, n))
        mean_x = (ones @ sum_x).reshape(-1, L, d_model) / tokens.sum()
        point = {k: both(mean_x, (ones @ d).reshape(-1, L, d_model) / tokens.sum()) for k, d in sums_d.items()}
        draws = range(len(controls))
        out["control"], out["vs_control"] = {}, {}
        for i, (name, reps) in enumerate((("slope", slopes), ("final_cosine_with_probe", cosines))):
            ctl_point = float(np.mean([point[k][i][0] for k in draws]))
            ctl_reps = draw_mean(np.stack([np.concatenate(reps[k]) for k in draws]), seed)
            out["control"][name] = {"mean": ctl_point, "ci95": percentile_ci(ctl_reps), "n": int(n),
                                    "draws": len(controls),
                                    "per_draw": [float(point[k][i][0]) for k in draws]}
            diff, ci = vs_placebos(point["aligned"][i][0], np.concatenate(reps["aligned"]),
                                   [point[k][i][0] for k in draws], np.stack([np.concatenate(reps[k]) for k in draws]))
            out["vs_control"][name] = {"mean": diff, "ci95": ci, "n": int(n), "interval": "prediction (vs_placebos)"}
    return out


class NeuronEstimate(TypedDict):
    mean: float | None
    ci95: list[float] | None  # bootstrap over neurons
    n: int  # neurons
    unit: str  # "neurons"


class OffsetContribution(NeuronEstimate):
    weights: str  # which mean activations weight the shifts


class ValueShiftStats(TypedDict):
    offset_layer: int  # the last layer, where δx̂ is taken
    share_anti_aligned: NeuronEstimate  # share of shifted neurons before it with cos(Δv_i, δx) < 0
    contribution_along_offset: OffsetContribution  # Σ over those of m̄_i Δv_i·δx̂


def value_shift_stats(dv: dict[int, torch.Tensor], delta: torch.Tensor, ms_aligned: torch.Tensor,
                      n_boot: int = 2000, seed: int = 0, replicates: bool = False) -> ValueShiftStats:
    """Value-vector shifts Δv_i (aligned − base) of the layers before the last against δx̂ there.

    share_anti_aligned: share of shifted neurons with cos(Δv_i, δx) < 0. contribution_along_offset:
    Σ over those anti-aligned neurons of m̄_i Δv_i·δx̂, m̄_i the aligned model's mean m/s on the base
    tokens (so that Σ over all neurons of m̄_i Δv_i is the part of δx the shifts make); positive
    when negative activations turn anti-aligned shifts toward δx. Intervals: bootstrap over neurons.
    With `replicates`, each estimate keeps its bootstrap replicates (`_replicates`, not for JSON), so
    that two models' estimates can be compared."""
    last = len(delta) - 1
    d_hat = delta[last] / delta[last].norm().clamp(min=1e-30)
    shifts = torch.cat([dv[j] for j in range(last)]) if last else torch.zeros(0, delta.shape[-1])  # [N, d_model]
    norms = shifts.norm(dim=-1)
    shifted = norms > 0  # neurons that DPO left exactly unchanged carry no direction
    along = shifts @ d_hat  # [N]
    anti = shifted & (along < 0)
    share = anti[shifted].double().numpy()  # [n_shifted] 1 where anti-aligned
    contrib = (ms_aligned[:last].flatten() * along)[anti].double().numpy()  # [n_anti]
    share_reps = bootstrap_sum(share, n_boot, seed) / len(share) if len(share) else None
    contrib_reps = bootstrap_sum(contrib, n_boot, seed) if len(contrib) else None
    out = {"offset_layer": last,
           "share_anti_aligned": {"mean": float(share.mean()) if len(share) else None,
                                  "ci95": percentile_ci(share_reps) if len(share) else None, "n": int(len(share)),
                                  "unit": "neurons"},
           "contribution_along_offset": {"mean": float(contrib.sum()),
                                         "ci95": percentile_ci(contrib_reps) if len(contrib) else None,
                                         "n": int(len(contrib)), "unit": "neurons",
                                         "weights": "aligned model's mean m/s on the base model's tokens"}}
    if replicates:
        out["share_anti_aligned"]["_replicates"] = share_reps
        out["contribution_along_offset"]["_replicates"] = contrib_reps
    return out


def vs_control(aligned: dict, controls: list[dict], seed: int = 0) -> dict:
    """aligned − the mean of K control draws' estimates, each with independent bootstrap replicates
    (`_replicates`, e.g. over each model's neurons), the draws resampled too (`draw_mean`); and the
    controls' mean estimate. Replicates are dropped from the inputs."""
    a = aligned.pop("_replicates", None)
    reps = [c.pop("_replicates", None) for c in controls]
    ok = a is not None and all(r is not None for r in reps) and aligned["mean"] is not None \
        and all(c["mean"] is not None for c in controls)
    if not ok:
        return {"mean": None, "ci95": None, "control": {"mean": None, "ci95": None, "draws": len(controls)}}
    ctl = draw_mean(np.stack(reps), seed)
    mean = float(np.mean([c["mean"] for c in controls]))
    diff, ci = vs_placebos(aligned["mean"], np.asarray(a), [c["mean"] for c in controls], np.stack(reps))
    return {"mean": diff, "ci95": ci,
            "control": {"mean": mean, "ci95": percentile_ci(ctl), "draws": len(controls),
                        "per_draw": [c["mean"] for c in controls], "n": controls[0].get("n")}}

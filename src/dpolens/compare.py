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


def offset_stats(base: Stats, aligned: Stats, w_hat: torch.Tensor, offset: list[OffsetLayer], n_boot: int = 2000,
                 seed: int = 0) -> OffsetStats:
    """Intervals over prompts for the offset's growth (least-squares slope over layers of
    ‖δx_l‖/‖x_l‖) and for cos(δx at the last layer, probe). Point values: those of `offset`
    (token-weighted over all prompts). Each replicate recomputes both from resampled prompts'
    mean resid_mid, weighted by their continuation tokens, as the point values are."""
    L = len(offset)
    keep = base.prompt_tokens > 0
    tok = base.prompt_tokens[keep].double()  # [n]
    n, d_model = len(tok), base.x_sum.shape[-1]
    if n == 0:  # no prompt has a continuation: nothing to resample
        return {"slope": None, "final_cosine_with_probe": None, "unit": "prompts", "layers": L}

    def prompt_sums(st: Stats) -> torch.Tensor:  # [n, L * d_model] per-prompt sums of resid_mid over tokens
        return (torch.stack([st.per_prompt_x[l][keep] for l in range(L)], 1).double() * tok[:, None, None]).reshape(n, -1)

    sum_x = prompt_sums(base)
    sum_d = (prompt_sums(aligned) - sum_x).numpy()
    sum_x, tokens = sum_x.numpy(), tok.numpy()
    layers = np.arange(L) - (L - 1) / 2
    w = w_hat.double().numpy()
    slopes, cosines = [], []
    for counts in bootstrap_counts(n, n_boot, seed, chunk=100):  # [k, n]
        boot_tokens = (counts @ tokens)[:, None, None]  # [k, 1, 1]
        mean_x = (counts @ sum_x).reshape(-1, L, d_model) / boot_tokens  # [k, L, d_model]
        mean_d = (counts @ sum_d).reshape(-1, L, d_model) / boot_tokens
        rel = np.linalg.norm(mean_d, axis=-1) / np.linalg.norm(mean_x, axis=-1)  # [k, L]
        slopes.append(rel @ layers / (layers @ layers))
        cosines.append(mean_d[:, -1] @ w / np.linalg.norm(mean_d[:, -1], axis=-1))
    rel_point = np.array([o["relative_norm"] for o in offset])
    return {"slope": {"mean": float(rel_point @ layers / (layers @ layers)), "ci95": percentile_ci(np.concatenate(slopes)),
                      "n": int(n)},
            "final_cosine_with_probe": {"mean": offset[-1]["cosine_with_probe"],
                                        "ci95": percentile_ci(np.concatenate(cosines)), "n": int(n)},
            "unit": "prompts", "layers": L}


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
                      n_boot: int = 2000, seed: int = 0) -> ValueShiftStats:
    """Value-vector shifts Δv_i (aligned − base) of the layers before the last against δx̂ there.

    share_anti_aligned: share of shifted neurons with cos(Δv_i, δx) < 0. contribution_along_offset:
    Σ over those anti-aligned neurons of m̄_i Δv_i·δx̂, m̄_i the aligned model's mean m/s on the base
    tokens (so that Σ over all neurons of m̄_i Δv_i is the part of δx the shifts make); positive
    when negative activations turn anti-aligned shifts toward δx. Intervals: bootstrap over neurons."""
    last = len(delta) - 1
    d_hat = delta[last] / delta[last].norm().clamp(min=1e-30)
    shifts = torch.cat([dv[j] for j in range(last)]) if last else torch.zeros(0, delta.shape[-1])  # [N, d_model]
    norms = shifts.norm(dim=-1)
    shifted = norms > 0  # neurons that DPO left exactly unchanged carry no direction
    along = shifts @ d_hat  # [N]
    anti = shifted & (along < 0)
    share = anti[shifted].double().numpy()  # [n_shifted] 1 where anti-aligned
    contrib = (ms_aligned[:last].flatten() * along)[anti].double().numpy()  # [n_anti]
    return {"offset_layer": last,
            "share_anti_aligned": {"mean": float(share.mean()) if len(share) else None,
                                   "ci95": percentile_ci(bootstrap_sum(share, n_boot, seed) / len(share))
                                   if len(share) else None, "n": int(len(share)), "unit": "neurons"},
            "contribution_along_offset": {"mean": float(contrib.sum()),
                                          "ci95": percentile_ci(bootstrap_sum(contrib, n_boot, seed))
                                          if len(contrib) else None, "n": int(len(contrib)), "unit": "neurons",
                                          "weights": "aligned model's mean m/s on the base model's tokens"}}

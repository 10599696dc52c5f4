"""Streaming activation statistics over continuation tokens (shared by analysis and neurons), and
the seeded bootstraps over prompts that turn them into intervals.

Sequences are (prompt ids, continuation ids). One forward per batch over prompt+continuation
(teacher-forced; causal, so identical to what the model computed while generating); only
continuation positions are summed, selected by position. Everything is accumulated as fp32 sums
of shape [n_layers, d_mlp] or [n_layers, d_model]; per-prompt reductions (means or sums over a
prompt's continuation tokens) are kept only where a figure or an interval over prompts needs them,
never per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dpolens.model import hooks
from dpolens.model.generation import left_pad, length_batches, position_ids
from dpolens.model.loading import LoadedModel


@dataclass
class Stats:
    m_sum: torch.Tensor  # [n_layers, d_mlp]  Σ_t m_{i,t}
    m_over_s_sum: torch.Tensor  # [n_layers, d_mlp]  Σ_t m_{i,t} / s_t (exact residual contribution scale)
    x_sum: torch.Tensor  # [n_layers, d_model]  Σ_t resid_mid
    count: int = 0
    prompt_tokens: torch.Tensor | None = None  # [n_prompts]  continuation tokens per prompt
    per_prompt_x: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n_prompts, d_model] mean
    per_prompt_m: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n_prompts, d_mlp] mean
    per_prompt_neuron_m: torch.Tensor | None = None  # [n_prompts, n_neurons]  Σ_t m over the `neurons` asked for
    per_prompt_neuron_ms: torch.Tensor | None = None  # [n_prompts, n_neurons]  Σ_t m/s over the same neurons
    per_prompt_ms: torch.Tensor | None = None  # [n_prompts, n_layers, d_mlp]  Σ_t m/s (only when asked)

    @property
    def mean_m(self) -> torch.Tensor:
        return self.m_sum / max(self.count, 1)

    @property
    def mean_m_over_s(self) -> torch.Tensor:
        return self.m_over_s_sum / max(self.count, 1)

    @property
    def mean_x(self) -> torch.Tensor:
        return self.x_sum / max(self.count, 1)


@torch.inference_mode()
def continuation_stats(lm: LoadedModel, seqs: list[tuple[list[int], list[int]]], fig_layers: list[int] = (),
                       batch_size: int = 32, desc: str = "activations", progress: bool = True, *,
                       x_layers: Iterable[int] | None = None, neurons: Sequence[tuple[int, int]] = (),
                       per_prompt_ms: bool = False) -> Stats:
    """Sums over continuation tokens of m, m/s and resid_mid for every layer, plus per-prompt
    reductions: means of resid_mid for `x_layers` (default: `fig_layers`) and of m for
    `fig_layers`; sums of m for the (layer, neuron) pairs in `neurons` (in that order); with
    `per_prompt_ms`, sums of m/s for every neuron (what intervals over prompts of per-neuron
    projections need: n_prompts × n_layers × d_mlp fp32)."""
    a = lm.adapter
    L, n = a.n_layers, len(seqs)
    x_layers = fig_layers if x_layers is None else x_layers
    st = Stats(torch.zeros(L, a.d_mlp), torch.zeros(L, a.d_mlp), torch.zeros(L, a.d_model),
               prompt_tokens=torch.tensor([len(c) for _, c in seqs], dtype=torch.float32),
               per_prompt_x={l: torch.zeros(n, a.d_model) for l in x_layers},
               per_prompt_m={l: torch.zeros(n, a.d_mlp) for l in fig_layers},
               per_prompt_neuron_m=torch.zeros(n, len(neurons)), per_prompt_neuron_ms=torch.zeros(n, len(neurons)),
               per_prompt_ms=torch.zeros(n, L, a.d_mlp) if per_prompt_ms else None)
    # layer -> (neuron ids, their columns in per_prompt_neuron_m)
    neuron_cols = {l: (torch.tensor([i for (k, i) in neurons if k == l]),
                       torch.tensor([c for c, (k, _) in enumerate(neurons) if k == l]))
                   for l in {k for k, _ in neurons}}
    points = [(l, p) for l in range(L) for p in ("mlp_act", "mlp_raw", "resid_mid")]
    for idx in tqdm(length_batches([len(p) + len(c) for p, c in seqs], batch_size), desc=desc,
                    disable=not progress, unit="batch"):
        ids, mask = left_pad([seqs[i][0] + seqs[i][1] for i in idx], lm.tokenizer.pad_token_id, lm.device)
        width = ids.shape[1]
        cont = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        for row, i in enumerate(idx):
            if seqs[i][1]:
                cont[row, width - len(seqs[i][1]):] = 1
        ncont = cont.sum(1, keepdim=True).clamp(min=1)
        rows = torch.tensor(idx)
        held: dict[int, torch.Tensor] = {}

        def acc(layer, point, t):
            if point == "mlp_act":
                held[layer] = t.float() * cont.unsqueeze(-1)  # [B, T, d_mlp]; held until mlp_raw arrives
                st.m_sum[layer] += held[layer].sum((0, 1)).cpu()
                if layer in st.per_prompt_m:
                    st.per_prompt_m[layer][rows] = (held[layer].sum(1) / ncont).cpu()
                if layer in neuron_cols:
                    ids_l, cols = neuron_cols[layer]
                    st.per_prompt_neuron_m[rows.unsqueeze(1), cols] = held[layer][..., ids_l.to(t.device)].sum(1).cpu()
            elif point == "mlp_raw":
                s = a.contribution_scale(layer, t)
                m_over_s = held.pop(layer) / s.unsqueeze(-1)  # [B, T, d_mlp]
                st.m_over_s_sum[layer] += m_over_s.sum((0, 1)).cpu()
                if st.per_prompt_ms is not None:
                    st.per_prompt_ms[rows, layer] = m_over_s.sum(1).cpu()
                if layer in neuron_cols:
                    ids_l, cols = neuron_cols[layer]
                    st.per_prompt_neuron_ms[rows.unsqueeze(1), cols] = m_over_s[..., ids_l.to(t.device)].sum(1).cpu()
            else:
                x = t.float() * cont.unsqueeze(-1)
                st.x_sum[layer] += x.sum((0, 1)).cpu()
                if layer in st.per_prompt_x:
                    st.per_prompt_x[layer][rows] = (x.sum(1) / ncont).cpu()

        with hooks.capture(a, points, fn=acc):
            a.body(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
        st.count += int(cont.sum())
    return st


# ---- bootstrap over prompts or neurons ---------------------------------------------------------

def bootstrap_counts(n: int, n_boot: int = 2000, seed: int = 0, chunk: int | None = None) -> Iterator[np.ndarray]:
    """The replicates of `evaluate.resample_units(n, n_boot, seed)` as multiplicities, [chunk, n]
    float64 per step (how often each unit was drawn; by default chunks of at most 4M entries), so
    that sums and ratios of sums (token-weighted means) of wide per-unit arrays are one matrix
    product per chunk. The replicates do not depend on `chunk`."""
    rng = np.random.default_rng(seed)
    chunk = chunk or max(1, min(n_boot, 4_000_000 // max(n, 1)))
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(k, n)) + n * np.arange(k)[:, None]
        yield np.bincount(idx.ravel(), minlength=k * n).reshape(k, n).astype(np.float64)


def bootstrap_sum(values, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """[n_boot] sums of `values` ([n]) over seeded bootstrap resamples of its n units."""
    v = np.asarray(values, dtype=np.float64)
    return np.concatenate([w @ v for w in bootstrap_counts(len(v), n_boot, seed)])

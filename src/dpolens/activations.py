"""Streaming activation statistics over continuation tokens (shared by analysis and neurons).

Sequences are (prompt ids, continuation ids). One forward per batch over prompt+continuation
(teacher-forced; causal, so identical to what the model computed while generating); only
continuation positions are summed, selected by position. Everything is accumulated as fp32 sums
of shape [n_layers, d_mlp] or [n_layers, d_model]; per-prompt means are kept only for the few
layers a figure needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from dpolens.model import hooks
from dpolens.model.generation import left_pad, length_batches
from dpolens.model.loading import LoadedModel


@dataclass
class Stats:
    m_sum: torch.Tensor  # [n_layers, d_mlp]  Σ_t m_{i,t}
    m_over_s_sum: torch.Tensor  # [n_layers, d_mlp]  Σ_t m_{i,t} / s_t (exact residual contribution scale)
    x_sum: torch.Tensor  # [n_layers, d_model]  Σ_t resid_mid
    count: int = 0
    per_prompt_x: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n_prompts, d_model]
    per_prompt_m: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n_prompts, d_mlp]

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
                       batch_size: int = 32, desc: str = "activations", progress: bool = True) -> Stats:
    a = lm.adapter
    L, n = a.n_layers, len(seqs)
    st = Stats(torch.zeros(L, a.d_mlp), torch.zeros(L, a.d_mlp), torch.zeros(L, a.d_model),
               per_prompt_x={l: torch.zeros(n, a.d_model) for l in fig_layers},
               per_prompt_m={l: torch.zeros(n, a.d_mlp) for l in fig_layers})
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
            elif point == "mlp_raw":
                s = a.contribution_scale(layer, t)
                st.m_over_s_sum[layer] += (held.pop(layer) / s.unsqueeze(-1)).sum((0, 1)).cpu()
            else:
                x = t.float() * cont.unsqueeze(-1)
                st.x_sum[layer] += x.sum((0, 1)).cpu()
                if layer in st.per_prompt_x:
                    st.per_prompt_x[layer][rows] = (x.sum(1) / ncont).cpu()

        with hooks.capture(a, points, fn=acc):
            a.body(input_ids=ids, attention_mask=mask)
        st.count += int(cont.sum())
    return st

"""Architecture adapters: the only place that knows module names and weight layouts.

Per method.md section 0, for MLP neuron i of layer l:
  m_i  = the input of the MLP's output projection (post-GELU, or silu/gelu(gate) * up),
  v_i  = the neuron's direction in the residual stream (row of GPT-2's Conv1D c_proj, column of
         nn.Linear down projections; on Gemma 2/3 multiplied by the post-MLP RMSNorm gain 1+g),
  k_i  = the input weights that make m_i (GELU MLPs: c_fc / dense_h_to_4h; gated: up_proj row).
Residual points per layer: resid_pre (block input), resid_mid (after attention, before the MLP),
resid_post (block output); mlp_act (m); mlp_raw (the MLP's output before any post-norm);
mlp_out (the MLP's contribution to the residual, after Gemma's post-norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dpolens.artifacts import DpolensError

POINTS = ("resid_pre", "resid_mid", "resid_post", "mlp_act", "mlp_raw", "mlp_out")
Where = Literal["input", "output"]


class UnsupportedModelError(DpolensError):
    pass


_FAMILY_OF_MODEL_TYPE = {
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3_text": "gemma",
}
SUPPORTED = "GPT-2 (gpt2), GPT-NeoX/Pythia (gpt_neox), Llama/Mistral/Qwen2/Qwen3, Gemma/Gemma 2/Gemma 3 (text)"


@dataclass
class KeySlice:
    """Where neuron keys live: scale `weight[index]` (and `bias[index]`) to scale keys."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    dim: int  # the axis of `weight` that indexes neurons
    module: str  # the module name, recorded with any key scaling


class WideUnembed(nn.Linear):
    """The unembedding computed as W·xᵀ instead of x·Wᵀ: same parameters and values (to float
    reordering), but on CPU MKL's x·Wᵀ path is 1.3-4x slower for a vocabulary-sized W at the
    batch sizes of decoding (benchmarks/bench_unembed.py). Without autograd on CPU, from
    `BLOCK_MIN_ROWS` positions on, W is taken `BLOCK` vocabulary rows at a time into contiguous
    [positions, vocab] logits, each block's output in cache and no transposed view for argmax and
    softmax to stride through (1.2-1.5x for the head and its argmax at 64 positions). At 2,048-row
    blocks MKL gives the one-block products bit for bit (tests/test_adapters.py; gemma-3-270m's
    toxicity on 1,199 prompts was unchanged to the last bit), which BLAS does not promise: tiny
    blocks take its small-matrix path and differ in the last bits."""

    BLOCK = 2048
    BLOCK_MIN_ROWS = 32

    @classmethod
    def sharing(cls, linear: nn.Linear) -> WideUnembed:
        wide = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        wide.weight, wide.bias = linear.weight, linear.bias
        return wide

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [N, d_model]
        if torch.is_grad_enabled() or flat.device.type != "cpu" or len(flat) < self.BLOCK_MIN_ROWS:
            logits = (self.weight @ flat.T).T  # [N, vocab], a transposed view
        else:
            logits = flat.new_empty(len(flat), self.out_features)  # [N, vocab]
            for i in range(0, self.out_features, self.BLOCK):
                logits[:, i : i + self.BLOCK] = (self.weight[i : i + self.BLOCK] @ flat.T).T
        if self.bias is not None:
            logits = logits + self.bias
        return logits.reshape(*x.shape[:-1], -1)


class Adapter:
    """Uniform view of one causal LM's layers, residual points, neurons and readout."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = getattr(model.config, "text_config", None) or model.config
        model_type = self.config.model_type
        if model_type not in _FAMILY_OF_MODEL_TYPE:
            raise UnsupportedModelError(
                f"unsupported architecture '{model_type}' ({type(model).__name__}); "
                f"supported families: {SUPPORTED}"
            )
        self.family = _FAMILY_OF_MODEL_TYPE[model_type]
        self.model_type = model_type
        if self.family == "gpt2":
            self.body = model.transformer
            self.layers = model.transformer.h
            self.final_norm = model.transformer.ln_f
        elif self.family == "gpt_neox":
            self.body = model.gpt_neox
            self.layers = model.gpt_neox.layers
            self.final_norm = model.gpt_neox.final_layer_norm
        else:
            self.body = model.model
            self.layers = model.model.layers
            self.final_norm = model.model.norm
        self.unembed_module = model.get_output_embeddings()

    # ---- shape facts -------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    @property
    def d_mlp(self) -> int:
        return self.mlp_out_proj(0).weight.shape[0 if self.family == "gpt2" else 1]

    @property
    def mlp_kind(self) -> str:
        return "gelu" if self.family in ("gpt2", "gpt_neox") else "gated"

    @property
    def post_mlp_norm(self) -> bool:
        return self.model_type in ("gemma2", "gemma3_text")

    @property
    def tied_embeddings(self) -> bool:
        emb = self.model.get_input_embeddings().weight
        return self.unembed_module.weight.data_ptr() == emb.data_ptr()

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of the vocabulary head, of the input embeddings (0 where tied to the head: counted once, as
        the head) and of everything else (the body: layers and norms)."""
        head = self.unembed_module.weight
        emb = self.model.get_input_embeddings().weight
        skip = {head.data_ptr(), emb.data_ptr()}
        return {"head": head.numel(), "input_embeddings": 0 if self.tied_embeddings else emb.numel(),
                "body": sum(p.numel() for p in self.model.parameters() if p.data_ptr() not in skip)}

    @property
    def logit_softcap(self) -> float | None:
        return getattr(self.config, "final_logit_softcapping", None)

    @property
    def parallel_residual(self) -> bool:
        return self.family == "gpt_neox" and bool(self.config.use_parallel_residual)

    @property
    def context_length(self) -> int:
        for name in ("n_positions", "max_position_embeddings"):
            if getattr(self.config, name, None):
                return int(getattr(self.config, name))
        return 2048

    def describe(self) -> dict:
        return {
            "family": self.family,
            "model_type": self.model_type,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "mlp_kind": self.mlp_kind,
            "post_mlp_norm": self.post_mlp_norm,
            "tied_embeddings": self.tied_embeddings,
            "logit_softcap": self.logit_softcap,
            "parallel_residual": self.parallel_residual,
            "vocab_size": self.unembed_module.weight.shape[0],
        }

    # ---- modules -----------------------------------------------------------------------
    def mlp(self, layer: int) -> nn.Module:
        return self.layers[layer].mlp

    def mlp_out_proj(self, layer: int) -> nn.Module:
        mlp = self.mlp(layer)
        if self.family == "gpt2":
            return mlp.c_proj
        if self.family == "gpt_neox":
            return mlp.dense_4h_to_h
        return mlp.down_proj

    def post_mlp_norm_module(self, layer: int) -> nn.Module | None:
        return self.layers[layer].post_feedforward_layernorm if self.post_mlp_norm else None

    def point(self, layer: int, name: str) -> tuple[nn.Module, Where]:
        """The module and side (its input or output) where residual point `name` is read."""
        if not 0 <= layer < self.n_layers:
            raise DpolensError(f"layer {layer} out of range: the model has {self.n_layers} layers")
        block = self.layers[layer]
        if name == "resid_pre":
            return block, "input"
        if name == "resid_post":
            return block, "output"
        if name == "mlp_act":
            return self.mlp_out_proj(layer), "input"
        if name == "mlp_raw":
            return self.mlp(layer), "output"
        if name == "mlp_out":
            norm = self.post_mlp_norm_module(layer)
            return (norm, "output") if norm is not None else (self.mlp(layer), "output")
        if name == "resid_mid":
            if self.family == "gpt2":
                return block.ln_2, "input"
            if self.family == "gpt_neox":
                if self.parallel_residual:
                    raise DpolensError(
                        "this GPT-NeoX model uses a parallel residual: attention and MLP read the "
                        "same input, so there is no resid_mid; use resid_pre or resid_post"
                    )
                return block.post_attention_layernorm, "input"
            if self.family == "gemma" and self.model_type != "gemma":
                return block.pre_feedforward_layernorm, "input"
            return block.post_attention_layernorm, "input"
        raise DpolensError(f"unknown hook point '{name}' (known: {', '.join(POINTS)})")

    # ---- weights -----------------------------------------------------------------------
    def value_vectors(self, layer: int) -> torch.Tensor:
        """[d_mlp, d_model] residual-space value vectors, including Gemma's post-norm gain."""
        w = self.mlp_out_proj(layer).weight.detach()
        values = w if self.family == "gpt2" else w.T
        norm = self.post_mlp_norm_module(layer)
        if norm is not None:
            values = values * self.norm_gain(norm)
        return values

    def norm_gain(self, norm: nn.Module) -> torch.Tensor:
        """[d_model] per-dimension gain of a norm module (Gemma's RMSNorm multiplies by 1 + weight)."""
        w = getattr(norm, "weight", None)
        if w is None:
            return torch.ones(self.d_model)
        return w.detach().float() + (1.0 if self.family == "gemma" else 0.0)

    def final_norm_gain(self) -> torch.Tensor:
        """[d_model] the final norm's gain γ: how the readout scales each residual dimension."""
        return self.norm_gain(self.final_norm)

    def contribution_scale(self, layer: int, mlp_raw: torch.Tensor) -> torch.Tensor:
        """s_t per token: neuron i adds m_{i,t} · v_i / s_t to the residual (method.md section 0).

        1 without a post-MLP norm; the RMS of the raw MLP output with Gemma 2/3's post-norm."""
        norm = self.post_mlp_norm_module(layer)
        if norm is None:
            return torch.ones(mlp_raw.shape[:-1], dtype=mlp_raw.dtype, device=mlp_raw.device)
        return torch.sqrt(mlp_raw.float().pow(2).mean(-1) + norm.eps)

    def key_slice(self, layer: int) -> KeySlice:
        """The weights whose neuron-i slice scales m_i linearly (GELU: c_fc; gated: up_proj)."""
        mlp = self.mlp(layer)
        prefix = f"layers.{layer}.mlp"
        if self.family == "gpt2":
            return KeySlice(mlp.c_fc.weight, mlp.c_fc.bias, 1, f"{prefix}.c_fc")
        if self.family == "gpt_neox":
            return KeySlice(mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias, 0, f"{prefix}.dense_h_to_4h")
        return KeySlice(mlp.up_proj.weight, getattr(mlp.up_proj, "bias", None), 0, f"{prefix}.up_proj")

    def gate_slice(self, layer: int) -> KeySlice | None:
        """Gated MLPs: the gate_proj rows, whose neuron-i slice is the input of the nonlinearity
        (scaling it is what scaling a GELU key does: σ(c·k·x)); None for GELU MLPs."""
        if self.mlp_kind != "gated":
            return None
        mlp = self.mlp(layer)
        return KeySlice(mlp.gate_proj.weight, getattr(mlp.gate_proj, "bias", None), 0,
                        f"layers.{layer}.mlp.gate_proj")

    def neuron_slices(self, layer: int) -> list[tuple[nn.Parameter, int]]:
        """(parameter, neuron axis) of every weight that belongs to layer's MLP neurons:
        key (and gate) input weights with their biases, and the value (output) weights."""
        ks = self.key_slice(layer)
        out = [(ks.weight, ks.dim)] + ([(ks.bias, 0)] if ks.bias is not None else [])
        mlp = self.mlp(layer)
        if self.mlp_kind == "gated":
            out.append((mlp.gate_proj.weight, 0))
        proj = self.mlp_out_proj(layer)
        out.append((proj.weight, 0 if self.family == "gpt2" else 1))
        return out

    @torch.no_grad()
    def flip_neurons(self, layer: int, neurons) -> None:
        """Gated MLPs: negate the neurons' up_proj rows (m_i → −m_i) and down_proj columns (v_i → −v_i). The
        model computes exactly what it did: the sign of a gated neuron's activation is a convention, and a
        statistic that changes under this says nothing about the model."""
        if self.mlp_kind != "gated":
            raise ValueError(f"{self.family}'s MLP is not gated: its activation's sign is not a convention")
        idx = torch.as_tensor(list(neurons), dtype=torch.long)
        ks = self.key_slice(layer)
        ks.weight[idx] *= -1
        if ks.bias is not None:
            ks.bias[idx] *= -1
        self.mlp_out_proj(layer).weight[:, idx] *= -1

    def key_vectors(self, layer: int) -> torch.Tensor:
        """[d_mlp, d_model] key vectors (GELU: the fc input weights; gated: up_proj rows)."""
        ks = self.key_slice(layer)
        w = ks.weight.detach()
        return w.T if ks.dim == 1 else w

    @property
    def unembed(self) -> torch.Tensor:
        """[vocab, d_model] unembedding matrix."""
        return self.unembed_module.weight

    def logits(self, resid: torch.Tensor, apply_norm: bool = True) -> torch.Tensor:
        """Logit lens: final norm (optional), unembedding, and the final soft-cap if any."""
        x = self.final_norm(resid) if apply_norm else resid
        logits = self.unembed_module(x)
        cap = self.logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def soft_embed(self, probs: torch.Tensor) -> torch.Tensor:
        """Expected input embedding under a token distribution (Gemma scales by sqrt(d))."""
        emb = self.model.get_input_embeddings()
        scale = getattr(emb, "embed_scale", 1.0)
        return (probs.to(emb.weight.dtype) @ emb.weight) * scale

    def layer_index(self, layer: int, what: str = "layer") -> int:
        """`layer` counted from 0 (or from the end when negative), refused when the model has no such layer."""
        if not -self.n_layers <= layer < self.n_layers:
            raise DpolensError(f"{what} {layer} out of range: the model has {self.n_layers} layers")
        return layer % self.n_layers

    def check_neurons(self, layer: int, neurons, what: str = "neuron") -> None:
        """Refuse an MLP neuron index (value vector, key) that the layer does not have."""
        self.layer_index(layer, f"the layer of {what}")
        bad = [n for n in ([neurons] if isinstance(neurons, int) else neurons or []) if not 0 <= n < self.d_mlp]
        if bad:
            raise DpolensError(f"{what} {bad[0]} out of range: layer {layer} has {self.d_mlp} MLP neurons")

    def check_width(self, vector: torch.Tensor, what: str) -> None:
        if vector.shape[-1] != self.d_model:
            raise DpolensError(
                f"{what} has width {vector.shape[-1]} but the model's d_model is {self.d_model}"
            )

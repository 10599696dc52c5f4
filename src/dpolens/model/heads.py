"""Log-probabilities of labelled tokens, with the unembedding applied at those positions only.

Training on preferences needs log π(y|x) of the completion tokens. The unembedding is the largest
matrix of a small model (gemma-3-270m: 262k × 640, 63% of a token's forward FLOP), so projecting
prompt and padding positions through it is most of a step's cost for nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import MethodType

import torch

from dpolens.model.adapters import Adapter


class _PickedLogProb(torch.autograd.Function):
    """log softmax(logits)[target] per row, keeping softmax(logits) for a backward of one pass
    (autograd's log_softmax + gather takes three); also the entropy, without gradient.
    The backward overwrites the saved softmax: the graph cannot be retained."""

    @staticmethod
    def forward(ctx, logits, target):  # logits [n, vocab], target [n]
        lse = torch.logsumexp(logits, -1)
        picked = logits.gather(-1, target[:, None])[:, 0] - lse
        probs = (logits - lse[:, None]).exp_()
        entropy = lse - torch.bmm(probs[:, None], logits[:, :, None])[:, 0, 0]
        ctx.save_for_backward(probs, target)
        ctx.mark_non_differentiable(entropy)
        return picked, entropy

    @staticmethod
    def backward(ctx, grad_picked, _):
        probs, target = ctx.saved_tensors
        grad = probs.mul_(-grad_picked[:, None])
        grad.scatter_add_(-1, target[:, None], grad_picked[:, None])
        return grad, None


def label_logprobs(adapter: Adapter, hidden: torch.Tensor, labels: torch.Tensor,
                   outputs: tuple[str, ...] = ("log_probs", "entropy", "mean_logits", "is_top1")
                   ) -> dict[str, torch.Tensor]:
    """Per-token statistics of next-token `labels` given final `hidden` states (already final-normed).

    hidden: [batch, seq, d_model] aligned with labels: [batch, seq] (-100 = not scored). Returns
    [batch, seq] tensors, zero where not scored: `log_probs` (differentiable), `label_mask`, and
    those of `entropy`, `mean_logits`, `is_top1`, `log_sum_sq_probs` named in `outputs`, without
    gradient (what TRL logs and weights with)."""
    mask = labels != -100  # [batch, seq]
    # contiguous rows: the adapter's W·xᵀ unembedding returns a transposed view, and every pass below
    # reads along the vocabulary (3x slower strided on CPU)
    logits = adapter.logits(hidden[mask], apply_norm=False).float().contiguous()  # [n_scored, vocab]
    target = labels[mask]
    picked, entropy = _PickedLogProb.apply(logits, target)
    stats = {"log_probs": picked, "entropy": entropy}
    with torch.no_grad():
        if "mean_logits" in outputs:
            stats["mean_logits"] = logits.mean(-1)
        if "is_top1" in outputs:
            stats["is_top1"] = logits.argmax(-1) == target
        if "log_sum_sq_probs" in outputs:
            stats["log_sum_sq_probs"] = torch.logsumexp(2 * torch.log_softmax(logits, -1), -1)

    def spread(x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(mask.shape).masked_scatter(mask, x)

    return {"label_mask": mask, **{k: spread(v) for k, v in stats.items() if k in outputs or k == "log_probs"}}


@torch.inference_mode()
def picked_logprobs(adapter: Adapter, hidden: torch.Tensor, target: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """log softmax(logits)[target] per row of final-normed `hidden` [n, d_model] ([n] fp32): the head runs on
    `chunk` rows at a time, so that many sequences' scored positions share one pass over the unembedding (a
    few rows at a time re-read the whole matrix for each: 671 MB in fp32 on gemma-3-270m)."""
    out = torch.empty(len(target), dtype=torch.float32, device=hidden.device)
    for s in range(0, len(target), chunk):
        logits = adapter.logits(hidden[s : s + chunk], apply_norm=False).float().contiguous()  # rows contiguous
        out[s : s + chunk] = logits.gather(1, target[s : s + chunk, None])[:, 0] - logits.logsumexp(-1)
    return out


@contextmanager
def completion_head(model: torch.nn.Module, adapter: Adapter,
                    outputs: tuple[str, ...] = ("log_probs", "entropy", "mean_logits", "is_top1")):
    """Within the context, `model(..., labels=labels, fused_lm_head=True)` (TRL's fused-head call)
    returns TRL's `FusedCausalLMOutput` computed by `label_logprobs`: only labelled positions reach
    the unembedding, on every device. TRL 1.16 does this on Triton devices only; on CPU it projects
    every position. `outputs`: the per-token fields to fill, as TRL's `add_fused_lm_head` takes them.
    Other calls go to the forward in place before; it is restored on exit."""
    from trl.trainer.utils import FusedCausalLMOutput

    previous = model.forward
    own = model.__dict__.get("forward")  # TRL's patch is an instance attribute; a plain model has none

    def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        if not fused_lm_head or kwargs.get("shift_labels") is not None or kwargs.get("output_router_logits"):
            return previous(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        kwargs.pop("num_items_in_batch", None)
        kwargs.pop("shift_labels", None)
        kwargs["use_cache"] = False
        hidden = adapter.body(*args, **kwargs).last_hidden_state[:, :-1]
        out = label_logprobs(adapter, hidden, labels[:, 1:], outputs)
        loss = -out["log_probs"].sum() / out["label_mask"].sum().clamp(min=1)
        return FusedCausalLMOutput(loss=loss, **out)

    model.forward = MethodType(forward, model)
    try:
        yield model
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


# ---- exact greedy decoding with a bf16 screen of the vocabulary head (issue #34) --------------------------

BF16_U = 2.0 ** -8  # bfloat16's unit roundoff (8 significant bits)


class ScreenStats:
    """Rows the screened head decided, and those it handed to the full fp32 head."""

    def __init__(self):
        self.rows = 0
        self.fallbacks = 0

    def as_dict(self) -> dict:
        return {"rows": self.rows, "fallbacks": self.fallbacks}


def screened_argmax(x: torch.Tensor, weight: torch.Tensor, weight_bf16: torch.Tensor, bias: torch.Tensor | None,
                    banned: torch.Tensor | None, k: int, w_norm_max: float, stats: ScreenStats | None = None,
                    force_fallback: bool = False) -> torch.Tensor:
    """The fp32 head's argmax (banned ids excluded) of each row of `x` [n, d_model], without the fp32 head:
    bf16 logits over the whole vocabulary pick `k` candidates, their logits are recomputed in fp32 from the
    fp32 hidden state, and the best of them is taken. A row whose best exact candidate does not beat the
    (k+1)-th bf16 logit by more than the bf16 error bound gets the full fp32 head instead. No [n, vocab] fp32
    tensor is made on the fast path: the bf16 product, one ban fill and one top-k are its only passes over the
    vocabulary. A final soft-cap (tanh, monotone) does not change the argmax and is not applied.

    Bound: a bf16 product of bf16-rounded operands, accumulated in fp32 and rounded to bf16, is within
    (2u + u² + d·2⁻²⁴)·Σ|x_i w_i| + u·|logit| of the fp32 logit (u = 2⁻⁸), and Σ|x_i w_i| <= ‖x‖·max_v ‖w_v‖."""
    n, d = x.shape
    lb = torch.nn.functional.linear(x.to(torch.bfloat16), weight_bf16)  # [n, V] bf16
    if bias is not None:
        lb += bias.to(torch.bfloat16)
    if banned is not None and len(banned):
        lb.index_fill_(1, banned, -float("inf"))
    top = lb.topk(k + 1, dim=-1)
    cand, next_best = top.indices[:, :k], top.values[:, k].float()
    exact = torch.einsum("nd,nkd->nk", x.float(), weight[cand].float())  # fp32, from the fp32 hidden state
    if bias is not None:
        exact += bias.float()[cand]
    c = 2 * BF16_U + BF16_U ** 2 + d * 2.0 ** -24
    eps = c * x.float().norm(dim=-1) * w_norm_max + BF16_U * next_best.abs()
    best, at = exact.max(-1)
    ids = cand.gather(1, at[:, None])[:, 0]
    safe = best > next_best + eps
    if force_fallback:
        safe[:] = False
    if not bool(safe.all()):
        rows = (~safe).nonzero()[:, 0]
        full = x[rows].float() @ weight.float().T
        if bias is not None:
            full += bias.float()
        if banned is not None and len(banned):
            full.index_fill_(1, banned, -float("inf"))
        ids[rows] = full.argmax(-1)
    if stats is not None:
        stats.rows += n
        stats.fallbacks += int((~safe).sum())
    return ids


class ScreenedHead:
    """Greedy next tokens from final hidden states through `screened_argmax`: the argmax of the model's fp32
    unembedding (banned ids excluded) with a bf16 copy of it as the screen. Only for greedy decoding with no
    logits processor that reads other entries (repetition penalty)."""

    def __init__(self, adapter: Adapter, banned: list[int] | None = None, k: int = 16,
                 stats: ScreenStats | None = None, force_fallback: bool = False):
        head = adapter.unembed_module
        weight = head.weight.detach()
        if weight.dtype != torch.float32:
            raise ValueError(f"the screened head needs an fp32 unembedding, not {weight.dtype}")
        self.weight, self.weight_bf16 = weight, weight.to(torch.bfloat16)
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else bias.detach()
        self.ban = torch.tensor(sorted(banned or []), dtype=torch.long, device=weight.device)
        self.w_norm_max = float(weight.norm(dim=-1).max())
        self.k, self.stats, self.force_fallback = k, stats, force_fallback

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, d_model] final (normed) hidden states -> [n] token ids."""
        return screened_argmax(hidden, self.weight, self.weight_bf16, self.bias, self.ban, self.k, self.w_norm_max,
                               self.stats, self.force_fallback)

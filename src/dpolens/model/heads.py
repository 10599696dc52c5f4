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

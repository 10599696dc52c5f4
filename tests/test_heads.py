"""The completion-only head against a reference: full-vocabulary logits at every position."""

import torch
from trl.trainer.utils import add_fused_lm_head

from dpolens.model.heads import completion_head


def _batch(lm):
    enc = lm.tokenizer(["Holy cow, this is a great book", "You are such a piece"], return_tensors="pt",
                       padding=True)
    labels = enc["input_ids"].clone()
    labels[:, :3] = -100  # the prompt
    labels[enc["attention_mask"] == 0] = -100
    return enc, labels


def test_completion_head_matches_full_logits_and_gradients(tiny_lm):
    model = tiny_lm.model
    enc, labels = _batch(tiny_lm)
    full = model(**enc).logits[:, :-1]  # reference: every position through the head
    if tiny_lm.adapter.logit_softcap is not None:
        full = torch.tanh(full / tiny_lm.adapter.logit_softcap) * tiny_lm.adapter.logit_softcap
    target = labels[:, 1:]
    logp = torch.log_softmax(full.float(), -1)
    ref = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * (target != -100)
    ref_entropy = (-(logp.exp() * logp).sum(-1) * (target != -100)).detach()
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    trl_forward = model.__dict__["forward"]
    with completion_head(model, tiny_lm.adapter):
        out = model(**enc, labels=labels, fused_lm_head=True)
        assert model(**enc).logits.shape[-1] == full.shape[-1]  # other calls: the forward in place before
    assert model.__dict__["forward"] is trl_forward  # restored
    torch.testing.assert_close(out.log_probs, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy, ref_entropy, rtol=1e-4, atol=1e-5)
    out.log_probs.sum().backward()
    for name, g in ref_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, g, rtol=1e-4, atol=1e-6)
    trl_out = model(**enc, labels=labels, fused_lm_head=True)  # TRL's own fused head agrees too
    torch.testing.assert_close(trl_out.log_probs, out.log_probs.detach(), rtol=1e-5, atol=1e-5)


def test_completion_head_leaves_a_plain_model_as_it_was(tiny_lm):
    model = tiny_lm.model
    enc, _ = _batch(tiny_lm)
    before = model(**enc).logits
    with completion_head(model, tiny_lm.adapter):
        pass
    assert "forward" not in model.__dict__
    assert torch.equal(model(**enc).logits, before)

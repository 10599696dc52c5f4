"""Issue #34: greedy decoding with a bf16 screen of the vocabulary head gives plain fp32 greedy's tokens."""

import pytest
import torch

from dpolens.model.generation import generate
from dpolens.model.heads import ScreenStats, screened_logits
from dpolens.model.loading import load_model

PROMPTS = ["The weather number 1 is", "Hello there", "A much longer prompt with many words in it", "You are",
           "So I am", "Holy cow"]


def test_screened_argmax_is_the_fp32_argmax_and_close_calls_fall_back():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5000, 64, generator=g)
    x = torch.randn(300, 64, generator=g) * 3
    full = x @ W.T
    stats = ScreenStats()
    out = screened_logits(x, W, W.to(torch.bfloat16), None, None, 8, float(W.norm(dim=-1).max()), stats)
    assert torch.equal(out.argmax(-1), full.argmax(-1))
    assert stats.rows == 300 and stats.fallbacks < 300
    # candidates carry their fp32 logits, everything else is -inf
    top = out.argmax(-1)
    assert torch.allclose(out.gather(1, top[:, None]), full.gather(1, top[:, None]), rtol=1e-5, atol=1e-4)
    assert int(torch.isfinite(out).sum(-1).min()) >= 8
    # two rows of W that bf16 cannot tell apart: the row falls back (or the recompute separates them)
    W2 = W.clone()
    W2[1] = W2[0] * (1 + 1e-4)
    x2 = W2[0:1] * 10
    s2 = ScreenStats()
    o2 = screened_logits(x2, W2, W2.to(torch.bfloat16), None, None, 8, float(W2.norm(dim=-1).max()), s2)
    assert o2.argmax(-1).item() == (x2 @ W2.T).argmax(-1).item() == 1
    # banned ids are never candidates
    o3 = screened_logits(x2, W2, W2.to(torch.bfloat16), None, torch.tensor([1]), 8, float(W2.norm(dim=-1).max()))
    assert o3.argmax(-1).item() == 0 and o3[0, 1] == -float("inf")


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "gemma3"])
def test_screened_greedy_generation_gives_the_fp32_tokens(family, tiny_dirs):
    lm = load_model(tiny_dirs[family])
    plain = generate(lm, PROMPTS, 8, batch_size=3, progress=False)
    for force in (False, True):
        stats = ScreenStats()
        fast = generate(lm, PROMPTS, 8, batch_size=3, progress=False, head_screen=True, screen_stats=stats) \
            if not force else _forced(lm, stats)
        assert [g.continuation_ids for g in fast] == [g.continuation_ids for g in plain], (family, force)
        assert stats.rows >= len(PROMPTS)
        if force:
            assert stats.fallbacks == stats.rows
    # the head is restored: the plain logits are the model's own again
    ids = lm.tokenizer(PROMPTS[:1], return_tensors="pt")
    with torch.inference_mode():
        logits = lm.model(**ids).logits
    assert torch.isfinite(logits).all()


def _forced(lm, stats):
    """Greedy generation with every row sent to the full fp32 head (the fallback path)."""
    import dpolens.model.heads as heads

    real = heads.screened_head

    def forced(adapter, banned=None, k=16, stats=None, force_fallback=False):
        return real(adapter, banned, k, stats, True)

    heads.screened_head = forced
    try:
        return generate(lm, PROMPTS, 8, batch_size=3, progress=False, head_screen=True, screen_stats=stats)
    finally:
        heads.screened_head = real

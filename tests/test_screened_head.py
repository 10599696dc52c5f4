"""Issue #34: greedy decoding with a bf16 screen of the vocabulary head gives plain fp32 greedy's tokens."""

import pytest
import torch

from dpolens.model.generation import generate
from dpolens.model.heads import ScreenStats, screened_argmax
from dpolens.model.loading import load_model

PROMPTS = ["The weather number 1 is", "Hello there", "A much longer prompt with many words in it", "You are",
           "So I am", "Holy cow"]


def _argmax(x, W, banned=None, k=8, stats=None, force=False):
    return screened_argmax(x, W, W.to(torch.bfloat16), None, banned, k, float(W.norm(dim=-1).max()), stats, force)


def test_screened_argmax_is_the_fp32_argmax_and_close_calls_fall_back():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5000, 64, generator=g)
    x = torch.randn(300, 64, generator=g) * 3
    full = x @ W.T
    stats = ScreenStats()
    assert torch.equal(_argmax(x, W, stats=stats), full.argmax(-1))
    assert stats.rows == 300 and stats.fallbacks < 300
    forced = ScreenStats()
    assert torch.equal(_argmax(x, W, stats=forced, force=True), full.argmax(-1))
    assert forced.fallbacks == 300
    # two rows of W that bf16 cannot tell apart: the row falls back (or the recompute separates them)
    W2 = W.clone()
    W2[1] = W2[0] * (1 + 1e-4)
    x2 = W2[0:1] * 10
    assert _argmax(x2, W2).item() == (x2 @ W2.T).argmax(-1).item() == 1
    # banned ids are never chosen, on the fast path or the fallback
    for force in (False, True):
        assert _argmax(x2, W2, torch.tensor([1]), force=force).item() == 0


def test_a_bf16_tie_the_bound_cannot_rule_out_falls_back():
    """Candidates past the k-th are only ruled out when the bf16 margin exceeds the error bound: with more
    near-equal rows than k, the row must go to the full fp32 head, and still get its argmax."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(2000, 32, generator=g)
    base = torch.randn(32, generator=g)
    W[:20] = base + 1e-5 * torch.randn(20, 32, generator=g)  # 20 rows equal in bf16, k = 8
    x = base[None] * 5
    stats = ScreenStats()
    assert _argmax(x, W, stats=stats).item() == (x @ W.T).argmax(-1).item()
    assert stats.fallbacks == 1


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "gemma3"])
def test_screened_greedy_generation_gives_the_fp32_tokens(family, tiny_dirs):
    lm = load_model(tiny_dirs[family])
    plain = generate(lm, PROMPTS, 8, batch_size=3, progress=False)
    for force in (False, True):
        stats = ScreenStats()
        fast = generate(lm, PROMPTS, 8, batch_size=3, progress=False, head_screen=True, screen_stats=stats,
                        screen_options={"force_fallback": force})
        assert [g.continuation_ids for g in fast] == [g.continuation_ids for g in plain], (family, force)
        assert stats.rows >= len(PROMPTS)
        if force:
            assert stats.fallbacks == stats.rows
        else:
            assert stats.fallbacks < stats.rows
    # the model is untouched: its own logits are finite and generation without the screen is unchanged
    ids = lm.tokenizer(PROMPTS[:1], return_tensors="pt")
    with torch.inference_mode():
        logits = lm.model(**ids).logits
    assert torch.isfinite(logits).all()
    again = generate(lm, PROMPTS, 8, batch_size=3, progress=False)
    assert [g.continuation_ids for g in again] == [g.continuation_ids for g in plain]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_parameter_counts_split_the_model_into_head_input_embeddings_and_body(tiny_dirs, family):
    lm = load_model(tiny_dirs[family])
    n = lm.adapter.parameter_counts()
    unique = {p.data_ptr(): p.numel() for p in lm.model.parameters()}
    assert n["head"] + n["input_embeddings"] + n["body"] == sum(unique.values())
    assert n["head"] == lm.adapter.unembed.shape[0] * lm.adapter.d_model
    assert (n["input_embeddings"] == 0) == lm.adapter.tied_embeddings
    assert n["body"] > 0


def test_auto_screens_only_where_bf16_is_native_and_the_head_is_most_of_the_model(tiny_dirs, monkeypatch):
    import dpolens.model.loading as loading
    from dpolens.evaluate import EvalSettings, use_screen
    from dpolens.model.generation import head_dominates

    lm = load_model(tiny_dirs["llama"])
    monkeypatch.setattr(loading, "native_bf16", lambda device: True)
    for head, body in ((100, 99), (99, 100)):  # both outcomes (gemma-3-270m: 168M vs 100M; smollm2-135m: 28M vs 106M)
        monkeypatch.setattr(lm.adapter, "parameter_counts", lambda h=head, b=body: {"head": h, "input_embeddings": 0,
                                                                                     "body": b})
        assert head_dominates(lm) == (head > body)
        assert use_screen(EvalSettings(head_screen="auto"), lm) == (head > body)
        assert use_screen(EvalSettings(head_screen="on"), lm)
        assert not use_screen(EvalSettings(head_screen="off"), lm)
    monkeypatch.setattr(loading, "native_bf16", lambda device: False)
    assert not use_screen(EvalSettings(head_screen="auto"), lm)


def test_generate_auto_screens_where_screen_pays(tiny_dirs, monkeypatch):
    import dpolens.model.loading as loading

    lm = load_model(tiny_dirs["llama"])
    plain = generate(lm, PROMPTS, 6, batch_size=3, progress=False)
    monkeypatch.setattr(lm.adapter, "parameter_counts", lambda: {"head": 2, "input_embeddings": 0, "body": 1})
    for native, screened in ((True, True), (False, False)):
        monkeypatch.setattr(loading, "native_bf16", lambda device, n=native: n)
        stats = ScreenStats()
        gens = generate(lm, PROMPTS, 6, batch_size=3, progress=False, head_screen="auto", screen_stats=stats)
        assert (stats.rows > 0) == screened
        assert [g.continuation_ids for g in gens] == [g.continuation_ids for g in plain]


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])  # gemma3: the final soft-cap
def test_picked_logprobs_are_log_softmax_at_the_targets_in_any_chunking(tiny_dirs, family):
    from dpolens.model.heads import picked_logprobs

    lm = load_model(tiny_dirs[family])
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, lm.adapter.d_model, generator=g)
    target = torch.randint(0, lm.adapter.unembed.shape[0], (7,), generator=g)
    with torch.inference_mode():
        want = lm.adapter.logits(hidden, apply_norm=False).float().log_softmax(-1).gather(1, target[:, None])[:, 0]
    for chunk in (1, 3, 512):
        torch.testing.assert_close(picked_logprobs(lm.adapter, hidden, target, chunk), want, rtol=0, atol=1e-5)

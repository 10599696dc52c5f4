"""Cached, batched, left-padded generation against a slow one-prompt, no-cache reference."""

import pytest
import torch

from dpolens.model import hooks
from dpolens.model.generation import generate

PROMPTS = ["Holy", "You are such a piece of work, said", "The weather in Paris is", "So I am"]


def reference_greedy(lm, prompt, n):
    """Recompute the whole sequence every step, one prompt, no padding, no cache."""
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = []
    with torch.inference_mode():
        for _ in range(n):
            nxt = int(lm.model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            if nxt == lm.tokenizer.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_batched_greedy_matches_reference(tiny_lm):
    gens = generate(tiny_lm, PROMPTS, 8, batch_size=3, progress=False)
    for g, p in zip(gens, PROMPTS):
        assert g.prompt == p
        assert g.continuation_ids == reference_greedy(tiny_lm, p, 8)
        assert g.continuation == tiny_lm.tokenizer.decode(g.continuation_ids, skip_special_tokens=True)


def test_generation_under_intervention_matches_reference(tiny_lm):
    a = tiny_lm.adapter
    vec = 3.0 * torch.randn(a.d_model, generator=torch.Generator().manual_seed(1))
    with hooks.add_vector(a, a.n_layers - 1, "resid_post", vec):
        gens = generate(tiny_lm, PROMPTS, 6, batch_size=4, progress=False)
        refs = [reference_greedy(tiny_lm, p, 6) for p in PROMPTS]
    plain = generate(tiny_lm, PROMPTS, 6, batch_size=4, progress=False)
    assert [g.continuation_ids for g in gens] == refs
    assert [g.continuation_ids for g in plain] != refs


def test_seeded_sampling_is_reproducible(tiny_lm):
    a = generate(tiny_lm, PROMPTS, 8, do_sample=True, seed=5, progress=False)
    b = generate(tiny_lm, PROMPTS, 8, do_sample=True, seed=5, progress=False)
    c = generate(tiny_lm, PROMPTS, 8, do_sample=True, seed=6, progress=False)
    assert [g.continuation_ids for g in a] == [g.continuation_ids for g in b]
    assert [g.continuation_ids for g in a] != [g.continuation_ids for g in c]


def test_prompt_truncated_to_first_tokens(tiny_lm):
    long = "The quick brown fox jumps over the lazy dog. " * 20
    (g,) = generate(tiny_lm, [long], 2, max_prompt_tokens=10, progress=False)
    assert len(g.prompt_ids) == 10


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95])
def test_sampling_keeps_the_transformers_nucleus(top_p):
    """sample_next draws only from the tokens TopPLogitsWarper keeps, also for rows whose top
    `cap` miss the nucleus (the fallback), and every kept token can be drawn."""
    from transformers import TopPLogitsWarper

    from dpolens.model.generation import sample_next

    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(2, 300, generator=g) * 3
    flat = torch.randn(1, 300, generator=g) * 0.01  # the top 16 hold ~5% of the mass
    scores = torch.cat([peaked, flat])
    allowed = ~torch.isinf(TopPLogitsWarper(top_p)(None, scores.clone()))
    gen = torch.Generator().manual_seed(1)
    drawn = torch.zeros_like(allowed)
    for _ in range(3000):
        drawn.scatter_(1, sample_next(scores, 1.0, None, top_p, gen, cap=16), True)
    assert not (drawn & ~allowed).any()
    assert drawn[:2].sum() == allowed[:2].sum()  # small nuclei: every kept token turns up


def test_n_samples_reads_each_prompt_once_and_samples_as_repeated_prompts(tiny_lm):
    """n_samples continuations per prompt (consecutive) from one read of the prompt and its cache
    repeated: the same tokens as the prompts written out n_samples times, under the same seed."""
    k = 3
    shared = generate(tiny_lm, PROMPTS, 8, do_sample=True, top_p=0.9, seed=5, batch_size=len(PROMPTS) * k,
                      progress=False, n_samples=k)
    repeated = generate(tiny_lm, [p for p in PROMPTS for _ in range(k)], 8, do_sample=True, top_p=0.9, seed=5,
                        batch_size=len(PROMPTS) * k, progress=False)
    assert [g.prompt for g in shared] == [p for p in PROMPTS for _ in range(k)]
    assert [g.continuation_ids for g in shared] == [g.continuation_ids for g in repeated]
    assert len({tuple(g.continuation_ids) for g in shared[:k]}) > 1  # a prompt's samples differ
    with pytest.raises(Exception, match="needs do_sample"):
        generate(tiny_lm, PROMPTS, 2, progress=False, n_samples=2)
    # several length-sorted batches (prompts of different lengths, two prompts a batch): input order kept
    batched = generate(tiny_lm, PROMPTS, 4, do_sample=True, seed=1, batch_size=2 * k, progress=False, n_samples=k)
    assert [g.prompt for g in batched] == [p for p in PROMPTS for _ in range(k)]
    assert all(g.prompt_ids == tiny_lm.tokenizer(g.prompt)["input_ids"] for g in batched)


def test_sampling_logprobs_are_the_models_and_change_no_token(tiny_lm):
    """The log-probs read from the sampling loop are log softmax of the model's own logits at each
    sampled token (a no-cache, unpadded forward of the whole sequence), and asking for them draws the
    same tokens."""
    plain = generate(tiny_lm, PROMPTS, 8, do_sample=True, temperature=1.7, top_p=0.9, seed=3, batch_size=8,
                     n_samples=2, progress=False)
    with_lp = generate(tiny_lm, PROMPTS, 8, do_sample=True, temperature=1.7, top_p=0.9, seed=3, batch_size=8,
                       n_samples=2, progress=False, logprobs=True)
    assert [g.continuation_ids for g in plain] == [g.continuation_ids for g in with_lp]
    assert all(g.logprobs is None for g in plain)
    for g in with_lp:
        assert len(g.logprobs) == len(g.continuation_ids)
        if not g.continuation_ids:
            continue
        ids = torch.tensor([g.prompt_ids + g.continuation_ids])
        with torch.inference_mode():
            logp = tiny_lm.model(input_ids=ids, use_cache=False).logits[0].float().log_softmax(-1)
        n = len(g.continuation_ids)
        want = logp[-n - 1 : -1].gather(1, torch.tensor(g.continuation_ids)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(g.logprobs), want, atol=1e-4), (g.logprobs, want)
    with pytest.raises(Exception, match="do_sample"):
        generate(tiny_lm, PROMPTS, 4, logprobs=True, progress=False)

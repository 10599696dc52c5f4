"""Greedy generation on gemma-3-270m with the adapter's unembedding (`WideUnembed`: W·xᵀ, and from
32 positions on in vocabulary blocks into contiguous logits) against the same parameters behind a
plain nn.Linear (x·Wᵀ) and against W·xᵀ in one block (a transposed view), at the eval harness's
batch sizes. Goals: >= 1.2x over nn.Linear at batch 8; blocks faster at batch 64; the same
continuations in every variant."""

import torch
from common import SHARED, report, timed

from dpolens import load_model
from dpolens.data import load_prompts
from dpolens.model.generation import generate

lm = load_model("gemma-3-270m")
wide = lm.model.get_output_embeddings()
plain = torch.nn.Linear(wide.in_features, wide.out_features, bias=False, device="meta")
plain.weight = wide.weight
for batch in (8, 64):
    prompts = load_prompts(SHARED / "rtp/challenge_prompts.jsonl", batch)
    run = lambda: generate(lm, prompts, 20, batch_size=batch, progress=False)
    run()  # warm-up
    lm.model.set_output_embeddings(plain)
    base_s, base_out = timed(run, 2)
    lm.model.set_output_embeddings(wide)
    wide.BLOCK_MIN_ROWS = 10**9  # one block: (W·xᵀ)ᵀ as a transposed view
    one_s, one_out = timed(run, 2)
    del wide.BLOCK_MIN_ROWS  # the class's threshold again
    wide_s, wide_out = timed(run, 2)
    same = sum(a.continuation_ids == b.continuation_ids == c.continuation_ids
               for a, b, c in zip(base_out, one_out, wide_out))
    report(f"generation, {batch} prompts x 20 tokens, batch {batch} ({same}/{batch} continuations identical)",
           base_s, [("W·xᵀ, one block", one_s), ("W·xᵀ as dpolens loads it", wide_s)], batch * 20, "token")

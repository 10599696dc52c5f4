"""Greedy generation on gemma-3-270m with the adapter's W·xᵀ unembedding against the same
parameters behind a plain nn.Linear (x·Wᵀ), at the eval harness's batch sizes. Goal: >= 1.2x at
batch 8, same continuations."""

import torch
from common import SHARED, report, timed

from dpolens import load_model
from dpolens.data import load_prompts
from dpolens.model.generation import generate

lm = load_model("gemma-3-270m")
wide = lm.model.get_output_embeddings()
plain = torch.nn.Linear(wide.in_features, wide.out_features, bias=False, device="meta")
plain.weight = wide.weight
for batch in (8, 32):
    prompts = load_prompts(SHARED / "rtp/challenge_prompts.jsonl", batch)
    run = lambda: generate(lm, prompts, 20, batch_size=batch, progress=False)
    run()  # warm-up
    lm.model.set_output_embeddings(plain)
    base_s, base_out = timed(run, 2)
    lm.model.set_output_embeddings(wide)
    wide_s, wide_out = timed(run, 2)
    same = sum(a.continuation_ids == b.continuation_ids for a, b in zip(base_out, wide_out))
    report(f"generation, {batch} prompts x 20 tokens, batch {batch} ({same}/{batch} continuations identical)",
           base_s, [("W·xᵀ unembedding", wide_s)], batch * 20, "token")

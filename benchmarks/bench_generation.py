"""Greedy generation for toxicity evaluation on gemma-3-270m at batch 64 (20 new tokens after the
harness's 32-token prompts), as a share of this machine's fp32 roofline, taken as the rate of a
2048×2048 fp32 matmul (2·2048³ FLOP) measured in the same process. Goal (issue #16): >= 50%.

FLOP counted: prefill 2·P_body per prompt token, then per generated token 2·(P_body + V·d) (the
unembedding runs on one position per step); attention's score FLOP are left out (<3% here).
A hand-written KV-cached greedy loop measured 0.905x of transformers' generate here (2026-11-23),
so the harness keeps generate for greedy decoding.
"""

from common import SHARED, fp32_roofline, timed

from dpolens import load_model
from dpolens.data import load_prompts
from dpolens.model.generation import encode_prompts, generate

mm_s, roofline = fp32_roofline()

lm = load_model("gemma-3-270m")
n_params = sum(p.numel() for p in lm.model.parameters())
unembed = lm.adapter.unembed_module.weight.numel()  # vocab × d_model
body = n_params - unembed  # tied embeddings: the table is counted once, as the unembedding
prompts = load_prompts(SHARED / "rtp/challenge_prompts.jsonl", 64)
prompt_tokens = sum(len(x) for x in encode_prompts(lm, prompts, 32))
new_tokens = 20
flop = 2 * body * prompt_tokens + 2 * (body + unembed) * new_tokens * len(prompts)

run = lambda: generate(lm, prompts, new_tokens, batch_size=64, progress=False)
run()  # warm-up
gen_s, _ = timed(run, 2)
print(f"== fp32 matmul 2048x2048: {mm_s * 1e3:.1f} ms = {roofline / 1e9:.1f} GFLOP/s (the roofline used)")
print(f"== greedy generation, gemma-3-270m, 64 prompts ({prompt_tokens} prompt tokens) x {new_tokens} new tokens, "
      f"{flop / 1e12:.2f} TFLOP")
print(f"{'':<24} {'seconds':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'share of roofline':>18}")
print(f"{'transformers generate':<24} {gen_s:>8.2f} {64 * new_tokens / gen_s:>9.1f} {flop / gen_s / 1e9:>8.1f} "
      f"{flop / gen_s / roofline:>18.1%}")

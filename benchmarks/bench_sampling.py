"""On-policy pair sampling (pairs.method sample) on gemma-3-270m: 8 tweet prefixes × 8 samples × 20
tokens (T 1.0, top-p 0.95, one 64-row batch), sampled with the model in fp32 (baseline) and with the
bf16 copy that `pairs.sample_dtype: auto` takes where the CPU has AVX512-BF16 or AMX (elsewhere `auto`
stays fp32: torch emulates bf16 there, which issue #16 measured slower; not measured here)."""

from common import SHARED, report, timed

from dpolens import load_model
from dpolens.data import tweet_prompts
from dpolens.model.generation import generate
from dpolens.model.loading import cast_copy, native_bf16
from dpolens.stages.pairs import truncate_prompts

lm = load_model("gemma-3-270m")
prompts = truncate_prompts(lm, tweet_prompts([SHARED / "toxic-corpora/davidson_labeled_data.csv"])[:8], 24)
lm16 = cast_copy(lm, "bfloat16")


def sample(m):
    return generate(m, prompts, 20, do_sample=True, temperature=1.0, top_p=0.95, seed=0, batch_size=64,
                    max_prompt_tokens=None, progress=False, n_samples=8)


for m in (lm, lm16):
    generate(m, prompts[:2], 4, do_sample=True, top_p=0.95, batch_size=16, max_prompt_tokens=None,
             progress=False, n_samples=2)  # warm-up
fp32_s, _ = timed(lambda: sample(lm), 2)
bf16_s, _ = timed(lambda: sample(lm16), 2)
print(f"native bf16 on this CPU: {native_bf16('cpu')}")
report("sampling 64 continuations x 20 tokens, gemma-3-270m", fp32_s, [("bf16 copy (sample_dtype bfloat16)", bf16_s)],
       64 * 20, "tokens")

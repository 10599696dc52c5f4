"""Greedy toxicity-evaluation decoding (gemma-3-270m unless --model NAME): the plain fp32 head against the
bf16-screened head (issue #34: bf16 logits over the vocabulary pick 16 candidates, recomputed in fp32; a row whose bf16 margin
cannot rule out an outside token falls back to the full fp32 head). Both in this process, same prompts:
tokens/s, the ratio, the share of the fp32 and of the bf16 2048x2048 matmul rooflines (measured here), the
fallback rate, and the tokens that differ from plain fp32 decoding (goal 0).

  python benchmarks/bench_screen.py [N_PROMPTS] [--model NAME] [--force]   # default 256 (64 a batch); 1199
  for the whole check; without native bf16 it stops (the screen is off there) unless --force
"""

import sys

import torch
from common import SHARED, fp32_roofline, pop_option, timed

from dpolens import load_model
from dpolens.data import load_prompts
from dpolens.model.generation import encode_prompts, generate
from dpolens.model.heads import ScreenStats
from dpolens.model.loading import native_bf16

argv = sys.argv[1:]
model = pop_option(argv, "--model", "gemma-3-270m")
args = [a for a in argv if a != "--force"]
n = int(args[0]) if args else 256
if not native_bf16("cpu") and "--force" not in sys.argv:
    # measured 2026-12-06 on an AMD EPYC with AVX2 only: torch's bf16 matmul there is the emulated
    # cpublas path (bf16_dot_with_fp32_arith); 1,199 prompts ran 20 min without finishing both passes
    sys.exit("no native bf16 on this CPU (no AVX512-BF16/AMX): head_screen 'auto' decodes in fp32 here, so there "
             "is nothing to compare; --force times the emulated screen anyway")
mm_s, roof32 = fp32_roofline()
mm16_s, roof16 = fp32_roofline("bfloat16")

lm = load_model(model)
n_params = sum(p.numel() for p in lm.model.parameters())
unembed = lm.adapter.unembed_module.weight.numel()
body = n_params - unembed
prompts = load_prompts(SHARED / "rtp/challenge_prompts.jsonl", n)
prompt_tokens = sum(len(x) for x in encode_prompts(lm, prompts, 32))
new = 20
flop = 2 * body * prompt_tokens + 2 * (body + unembed) * new * len(prompts)

plain = lambda: generate(lm, prompts, new, batch_size=64, progress=False)
stats = ScreenStats()
screened = lambda: generate(lm, prompts, new, batch_size=64, progress=False, head_screen=True, screen_stats=stats)
generate(lm, prompts[:64], new, batch_size=64, progress=False)  # warm-up
generate(lm, prompts[:64], new, batch_size=64, progress=False, head_screen=True)
t32, g32 = timed(plain, 1)
stats.__init__()
tsc, gsc = timed(screened, 1)
diff_tokens = sum(x != y for a_, b_ in zip(g32, gsc) for x, y in zip(a_.continuation_ids, b_.continuation_ids)) + \
    sum(abs(len(a_.continuation_ids) - len(b_.continuation_ids)) for a_, b_ in zip(g32, gsc))
diff_rows = sum(a_.continuation_ids != b_.continuation_ids for a_, b_ in zip(g32, gsc))
total = sum(len(g.continuation_ids) for g in g32)
print(f"== native bf16 on this device: {native_bf16('cpu')}; torch threads {torch.get_num_threads()}")
print(f"== matmul 2048^3: fp32 {roof32 / 1e9:.1f} GFLOP/s, bf16 {roof16 / 1e9:.1f} GFLOP/s ({roof16 / roof32:.2f}x)")
print(f"== greedy, {model}, {len(prompts)} prompts ({prompt_tokens} prompt tokens) x {new} new, "
      f"{flop / 1e12:.2f} TFLOP (model FLOP, as fp32)")
print(f"{'':<18} {'seconds':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'% fp32 roof':>12} {'% bf16 roof':>12}")
for name, t in (("fp32 head", t32), ("bf16-screened", tsc)):
    print(f"{name:<18} {t:>8.2f} {len(prompts) * new / t:>9.1f} {flop / t / 1e9:>8.1f} {flop / t / roof32:>12.1%} "
          f"{flop / t / roof16:>12.1%}")
print(f"screened / fp32 speed: {t32 / tsc:.3f}x")
print(f"fallback rows: {stats.fallbacks} of {stats.rows} ({stats.fallbacks / max(stats.rows, 1):.2%})")
print(f"differing tokens: {diff_tokens} of {total} ({diff_rows} of {len(prompts)} continuations differ)")

"""The evaluation harness's generation (`evaluate._generate_resumable`, what every toxicity and F1 row of a study
runs), gemma-3-270m unless --model NAME, on the study's inputs: N challenge prompts (cut to 32 tokens) and the
first 50 F1 rows (WikiText paragraphs, uncut), 20 greedy tokens each. Variants, all in this process on the same
prompts, against the harness as it was before 2026-12-07 (batches of 64 consecutive prompts, fp32 head):

  input/fp32      the baseline: batches of 64 consecutive prompts (a batch pads to its longest prompt)
  input/screen    the same batches, the bf16-screened head where `head_screen: auto` turns it on
  length/fp32     batches sorted by prompt length over all prompts, at most 2,048 prompt positions a batch
  length/screen   both: what `EvalSettings()` does now (on a CPU without native bf16 the screen is off: the
                  screen rows then equal the fp32 rows)
  length/screen/128  the same with 128 rows and 4,096 prompt positions a batch
  length/screen/256  the same with 256 rows and 8,192 prompt positions a batch

Prints seconds, the ratio to the baseline, the prompt positions the batches pad to (against the prompts' real
tokens), and the tokens that differ from the baseline (from fp32 length order for the screen: the screen is
exact there, so the goal is 0; between orders, only fp32 summation order can differ: padding and batch shape
change the sums).

  python benchmarks/bench_eval_batches.py [N_PROMPTS] [--model NAME] [--only toxicity|f1] [--variants A,B,...]
  # default 1199 prompts (all), both sets, every variant (input/fp32, the baseline, is always run)
"""

import sys

import torch
from common import SHARED, pop_option, timed

from dpolens import load_model
from dpolens.data import load_f1_set, load_prompts
from dpolens.evaluate import EvalSettings, _generate_resumable, batch_chunks
from dpolens.model.generation import encode_prompts, screen_pays
from dpolens.model.loading import native_bf16

argv = sys.argv[1:]
model = pop_option(argv, "--model", "gemma-3-270m")
only = pop_option(argv, "--only", "")
chosen = pop_option(argv, "--variants", "")
n = int(argv[0]) if argv else 1199
lm = load_model(model)
prompts = load_prompts(SHARED / "rtp/challenge_prompts.jsonl", n)
f1_prompts = [r["prompt"] for r in load_f1_set(str(SHARED / "wiki/wiki_samples.jsonl"), 50)]
sets = {"toxicity": (prompts, 32), "f1": (f1_prompts, None)}
sets = {k: v for k, v in sets.items() if not only or k == only}
variants = {"input/fp32": EvalSettings(batch_order="input", head_screen="off"),
            "input/screen": EvalSettings(batch_order="input"),
            "length/fp32": EvalSettings(head_screen="off"),
            "length/screen": EvalSettings(),
            "length/screen/128": EvalSettings(batch_size=128, batch_tokens=4096),
            "length/screen/256": EvalSettings(batch_size=256, batch_tokens=8192)}
if chosen:
    variants = {v: s for v, s in variants.items() if v == "input/fp32" or v in chosen.split(",")}
print(f"== {model}; native bf16: {native_bf16('cpu')}; screen under auto: {screen_pays(lm)}; "
      f"torch threads {torch.get_num_threads()}")
_generate_resumable(lm, prompts[:64], EvalSettings(), None, "", False, 32)  # warm-up
for name, (ps, cut) in sets.items():
    real = sum(len(x) for x in encode_prompts(lm, ps, cut))
    times, out = {}, {}
    for v, s in variants.items():
        times[v], out[v] = timed(lambda: _generate_resumable(lm, ps, s, None, "", False, cut))
    print(f"== {name}: {len(ps)} prompts, {real} prompt tokens, 20 new tokens each")
    print(f"{'variant':<18} {'seconds':>8} {'vs baseline':>12} {'padded positions':>17} {'tokens differing':>30}")
    for v, s in variants.items():
        pos = sum(len(c) * max(len(encode_prompts(lm, [ps[i]], cut)[0]) for i in c)
                  for c in batch_chunks(lm, ps, s, cut))
        ref = "length/fp32" if v.startswith("length/screen") else "input/fp32"
        ref = ref if ref in out else "input/fp32"
        diff = sum(x != y for a, b in zip(out[v], out[ref]) for x, y in zip(a["continuation_ids"], b["continuation_ids"])) \
            + sum(abs(len(a["continuation_ids"]) - len(b["continuation_ids"])) for a, b in zip(out[v], out[ref]))
        rows = sum(a["continuation_ids"] != b["continuation_ids"] for a, b in zip(out[v], out[ref]))
        total = sum(len(a["continuation_ids"]) for a in out[ref])
        what = "" if v == ref else f"{diff} of {total} vs {ref} ({rows} rows)"
        print(f"{v:<18} {times[v]:>8.2f} {times['input/fp32'] / times[v]:>11.3f}x {pos:>17} {what:>30}")

"""glibc's allocator as dpolens tunes it (`dpolens.runtime.tune_allocator`: large temporaries stay in the
heap) against its default (every allocation above 128 KiB page-faulted in afresh), alternated in one
process on gemma-3-270m: greedy decoding (the fp32 head, and the bf16-screened head where the CPU has
native bf16), top-p sampling as the pairs stage does it, and a forward+backward of 8 sequences of 48
tokens as a DPO step's. Each timed twice per setting (best kept); the tokens and the loss must be equal.

  python benchmarks/bench_allocator.py [N_PROMPTS]   # default 128 (64 a batch)
"""

import ctypes
import sys

import torch
from common import SHARED, timed

from dpolens import load_model
from dpolens.data import load_prompts
from dpolens.model.generation import generate
from dpolens.model.loading import native_bf16
from dpolens.runtime import tune_allocator

libc = ctypes.CDLL("libc.so.6")


def default_allocator():
    # glibc's documented defaults (fixed: the dynamic threshold cannot be switched back on)
    libc.mallopt(-3, 128 * 1024)
    libc.mallopt(-1, 128 * 1024)
    libc.mallopt(-2, 0)
    libc.malloc_trim(0)


n = int(sys.argv[1]) if len(sys.argv) > 1 else 128
lm = load_model("gemma-3-270m")
prompts = load_prompts(SHARED / "rtp/challenge_prompts.jsonl", n)
batch = lm.tokenizer(prompts[:8], return_tensors="pt", padding="max_length", truncation=True, max_length=48)


def step():
    lm.model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        out = lm.model(**batch, labels=batch["input_ids"])
        out.loss.backward()
    return float(out.loss)


jobs = {"greedy, fp32 head": lambda: [g.continuation_ids for g in generate(lm, prompts, 20, batch_size=64,
                                                                             progress=False)],
        "sampling (pairs, fp32)": lambda: [g.continuation_ids for g in generate(
            lm, prompts[:64], 20, batch_size=64, progress=False, do_sample=True, top_p=0.95, n_samples=8)],
        "forward+backward 8x48": step}
if native_bf16("cpu"):
    jobs["greedy, bf16-screened head"] = lambda: [g.continuation_ids for g in generate(
        lm, prompts, 20, batch_size=64, progress=False, head_screen=True)]
best = {}
results = {}
for name, job in jobs.items():
    job()  # warm-up
    for setting in ("default", "tuned", "default", "tuned"):
        default_allocator() if setting == "default" else tune_allocator()
        t, out = timed(job, 1)
        best[name, setting] = min(best.get((name, setting), float("inf")), t)
        results.setdefault(name, []).append(out)
print(f"{'':<28} {'default s':>10} {'tuned s':>10} {'tuned/default speed':>20} {'same output':>12}")
for name in jobs:
    d, t = best[name, "default"], best[name, "tuned"]
    same = all(r == results[name][0] for r in results[name])
    print(f"{name:<28} {d:>10.2f} {t:>10.2f} {d / t:>20.3f}x {str(same):>12}")

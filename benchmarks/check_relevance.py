"""Does drift.relevance see a subject change? SmolLM2 base continuations (the study's no-op Table 2 row) on the
first 100 challenge prompts, against: (a) the same continuations (0 by construction), (b) the same continuations
shuffled across prompts (a model that ignores the prompt), (c) a placebo of the quickstart DPO's size, its own
greedy continuations, (d) the quickstart DPO model's own greedy continuations.

    python benchmarks/check_relevance.py runs/<study>/evals/<no-op row>.json runs/<run>/dpo/model
"""
import json
import sys

import numpy as np
import torch

import common  # noqa: F401  (puts src/ on the path)
from dpolens import load_model
from dpolens.compare import placebo
from dpolens.drift import relevance
from dpolens.model.generation import generate
torch.set_num_threads(1)
recs = json.load(open(sys.argv[1]))["result"]["records"][:100]
prompts, base_ids = [r["prompt"] for r in recs], [r["continuation_ids"] for r in recs]
base = load_model("smollm2-135m")
dpo = load_model(sys.argv[2])
def own(m):
    return [g.continuation_ids for g in generate(m, prompts, 20, batch_size=32, progress=False, max_prompt_tokens=32)]
regen = own(base)
print("base regenerated == cached:", sum(a == b for a, b in zip(regen, base_ids)), "of", len(base_ids))
rng = np.random.default_rng(0); perm = rng.permutation(len(prompts))
while (perm == np.arange(len(prompts))).any(): perm = rng.permutation(len(prompts))
def show(name, r):
    d, j = r["diff"], r["diff_by_judge"]
    print(f"{name}: base {r['base']['mean']:.3f}, other {r['aligned']['mean']:.3f}, diff {d['mean']:+.4f} "
          f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] (judge base {j['base']['mean']:+.4f}, judge other {j['aligned']['mean']:+.4f}), n {d['n']}")
show("(a) same", relevance(base, base, prompts, base_ids, base_ids, 32))
show("(b) shuffled", relevance(base, base, prompts, base_ids, [base_ids[i] for i in perm], 32))
pl = placebo(base, dpo, 0)
show("(c) placebo", relevance(base, pl, prompts, base_ids, own(pl), 32))
dpo_ids = own(dpo)
print("dpo continuations identical to base:", sum(a == b for a, b in zip(dpo_ids, base_ids)))
show("(d) quickstart dpo", relevance(base, dpo, prompts, base_ids, dpo_ids, 32))

"""Where the pairs stage's time goes (issue #34), on the study's sample settings: tweet prefixes rated
>= 0.8 toxic, 8 prompts × 8 samples × 20 tokens a chunk (T 1.0, top-p 0.95), the study's gate.
Per part: sampling, scoring, and the NLL of both kept sides, computed by a second forward pass
(baseline, `continuation_nll`) or read from the sampling pass where the side's text re-encodes to
the sampled ids (`sampled_nll`, what the stage does when it samples with the fp32 model). Prints the
largest |NLL difference| between the two and how many gate decisions differ.

    python benchmarks/bench_pairs.py [model] [n_prompts]     # default smollm2-135m 64
"""

import math
import sys
import time

from common import report

from dpolens import load_model
from dpolens.scoring import get_scorer
from dpolens.stages import pairs as P

model, n = (sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"), int(sys.argv[2]) if len(sys.argv) > 2 else 64
cfg = P.PairsConfig(model=model, method="sample", prompt_source="tweets", n=1050, batch_size=8,
                    sample=P.SampleSettings(n_samples=8, temperature=1.0, top_p=0.95), min_prompt_toxicity=0.8,
                    out="unused.jsonl", gate=P.QualityGate(require_more_toxic=True, min_toxicity_gap=0.25,
                                                           max_nll_gap=1.5, min_dispreferred_toxicity=0.5, max_nll=4.5))
lm, scorer = load_model(model), get_scorer(cfg.scorer)
gen = P._Generator(lm, cfg, scorer)
prompts = P.candidate_prompts(cfg, lm, scorer, P.prompt_pool(cfg))[:n]
gen.pairs(prompts[:8], 10_000)  # warm-up
T = {"sampling": 0.0, "scoring": 0.0, "nll recomputed": 0.0, "nll reused": 0.0}
diffs, fallback, flips, kept = [], 0, 0, 0
for s in range(0, n, 8):
    b = prompts[s : s + 8]
    t = time.perf_counter()
    made, nll = gen.pairs(b, cfg.seed + s)
    T["sampling"] += time.perf_counter() - t  # includes scoring the 8 samples (below: scoring the kept sides)
    t = time.perf_counter()
    scorer.score([m[0] for m in made]), scorer.score([m[1] for m in made])
    T["scoring"] += time.perf_counter() - t
    t = time.perf_counter()
    new = P.score_pairs(lm, scorer, b, made, nll)
    T["nll reused"] += time.perf_counter() - t
    t = time.perf_counter()
    old = P.score_pairs(lm, scorer, b, made)
    T["nll recomputed"] += time.perf_counter() - t
    for pair, ro, rn in zip(nll, old, new):
        for v, key in zip(pair, ("preferred_nll", "dispreferred_nll")):
            fallback += v is None
            if v is not None and not math.isnan(ro[key]):
                diffs.append(abs(ro[key] - rn[key]))
        flips += P.gate_reason(ro, cfg.gate) != P.gate_reason(rn, cfg.gate)
        kept += P.gate_reason(ro, cfg.gate) is None
T["nll recomputed"] -= T["scoring"]  # score_pairs scores both sides too
T["nll reused"] -= T["scoring"]
total_old = T["sampling"] + T["scoring"] + T["nll recomputed"]
print(f"{model}, {n} prompts: " + ", ".join(f"{k} {v:.1f} s" for k, v in T.items()))
print(f"shares of the stage's time (recomputed NLL): sampling {T['sampling'] / total_old:.1%}, "
      f"scoring {T['scoring'] / total_old:.1%}, NLL {T['nll recomputed'] / total_old:.1%}")
print(f"sides {2 * n}: {fallback} re-encode to other ids (NLL recomputed); largest |NLL difference| "
      f"{max(diffs):.2e} nats/token; gate decisions that differ: {flips} of {n} ({kept} kept)")
report(f"pairs per chunk of 8 prompts, {model}", total_old,
       [("NLL from the sampling pass", T["sampling"] + T["scoring"] + T["nll reused"])], n, "prompts")

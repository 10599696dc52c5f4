"""What the pairs gate's `min_relevance_diff` would keep of a study's candidates (no sampling: the candidates file
is re-gated). Per threshold: pairs kept, their preferred − dispreferred relevance (PMI per token of side and
prompt under the base), both sides' toxicity and NLL, and the most lopsided non-toxic markers; then pairs the
threshold drops, for reading.

    python benchmarks/check_relevance_gate.py runs/<study>/pairs/pairs.candidates.jsonl smollm2-135m [n]
"""
import json
import sys
from dataclasses import replace

import numpy as np
import torch

import common  # noqa: F401  (puts src/ on the path)
from dpolens import load_model
from dpolens.drift import lopsided_markers
from dpolens.scoring import get_scorer
from dpolens.stages.pairs import QualityGate, fill_prior_nll, gate_reason, relevance_diff

torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 2)
rows = [json.loads(line) for line in open(sys.argv[1])]
n_wanted = int(sys.argv[3]) if len(sys.argv) > 3 else 1050
study = QualityGate(require_more_toxic=True, min_toxicity_gap=0.25, max_nll_gap=1.5, min_dispreferred_toxicity=0.5,
                    max_nll=4.5)  # the study configs' gate
lm = load_model(sys.argv[2])
fill_prior_nll(lm, rows, replace(study, min_relevance_diff=0.0))  # the priors of every candidate the rest passes
scorer = get_scorer("jigsaw-lstm")
passing = [r for r in rows if gate_reason(r, study) is None]
d = np.array([relevance_diff(r) for r in passing])
print(f"{len(rows)} candidates, {len(passing)} pass the study gate; relevance diff over them: mean {d.mean():.3f}, "
      f"quartiles {np.percentile(d, [25, 50, 75]).round(3).tolist()}, share < 0: {np.mean(d < 0):.3f}")
for thr in (None, -1.0, -0.5, -0.25, 0.0):
    g = replace(study, min_relevance_diff=thr)
    kept = [r for r in rows if gate_reason(r, g) is None]
    dk = np.array([relevance_diff(r) for r in kept])
    lop = lopsided_markers(scorer, [r["unpert_gen_text"] for r in kept], [r["pert_gen_text"] for r in kept])[:4]
    print(f"threshold {thr}: {len(kept)} kept ({len(kept) / len(rows):.3f} of candidates; {n_wanted} need "
          f"~{n_wanted * len(rows) / max(len(kept), 1):.0f} candidates); relevance diff {dk.mean():.3f}; toxicity "
          f"preferred {np.mean([r['preferred_toxicity'] for r in kept]):.3f} dispreferred "
          f"{np.mean([r['dispreferred_toxicity'] for r in kept]):.3f}; NLL preferred "
          f"{np.mean([r['preferred_nll'] for r in kept]):.2f} dispreferred {np.mean([r['dispreferred_nll'] for r in kept]):.2f}")
    print("   lopsided:", "; ".join(f"{m['word']!r} {m['preferred_share']:.3f} vs {m['dispreferred_share']:.3f}" for m in lop))
dropped = [r for r in passing if relevance_diff(r) < -0.5]
for r in dropped[:6]:
    print(f"dropped at -0.5 ({relevance_diff(r):.2f}): {r['prompt_text']!r} -> preferred {r['unpert_gen_text']!r} | "
          f"dispreferred {r['pert_gen_text']!r}")

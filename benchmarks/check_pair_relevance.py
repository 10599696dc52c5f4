"""The relevance gap of a pair set's kept sides (drift.pair_relevance) from a candidates file, with the study gate.

    python benchmarks/check_pair_relevance.py runs/<study>/pairs/pairs.candidates.jsonl smollm2-135m
"""
import sys

import json

import torch

import common  # noqa: F401  (puts src/ on the path)
from dpolens import load_model
from dpolens.drift import pair_relevance
from dpolens.stages.pairs import QualityGate, gate_reason
torch.set_num_threads(1)
rows = [json.loads(l) for l in open(sys.argv[1])]
gate = QualityGate(require_more_toxic=True, min_toxicity_gap=0.25, max_nll_gap=1.5, min_dispreferred_toxicity=0.5, max_nll=4.5)
kept = [r for r in rows if gate_reason(r, gate) is None]
lm = load_model(sys.argv[2])
r = pair_relevance(lm, [k["unpert_gen_text"] for k in kept], [k["pert_gen_text"] for k in kept],
                   [k["preferred_nll"] for k in kept], [k["dispreferred_nll"] for k in kept])
print(len(rows), "candidates,", len(kept), "kept")
for k in ("preferred", "dispreferred", "diff"):
    print(k, round(r[k]["mean"], 4), [round(x, 4) for x in r[k]["ci95"]], r[k]["n"])

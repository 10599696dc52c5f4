"""The pairs gate's fp32 NLL pass (`textquality.continuation_nll`, issue #34 item 4) on a study's real candidates:
the head applied row by row, as before 2026-12-07 (each side's 20-odd scored positions re-read the whole
unembedding: 671 MB in fp32 on gemma-3-270m), against the batch's scored positions through the head at once
(`heads.picked_logprobs`), same process, same sides. Prints seconds, the ratio, the largest NLL difference and how
many of the candidates' gate decisions (the study config's gate) change (goal 0).

  python benchmarks/bench_nll.py RUN_DIR [N_CANDIDATES]   # e.g. runs/study-gemma-3-270m 256
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from common import timed

from dpolens import load_model
from dpolens.model.generation import encode_prompts, left_pad, length_batches, position_ids
from dpolens.stages.pairs import QualityGate, gate_reason
from dpolens.textquality import continuation_nll

if len(sys.argv) < 2:  # `make bench` runs every benchmark bare: this one needs a finished study
    print(f"{Path(__file__).name}: skipped, needs RUN_DIR (see its docstring)")
    sys.exit(0)
run = Path(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 256
cfg = json.loads((run / "pairs" / "manifest.json").read_text())["config"]
gate = QualityGate(**cfg["gate"])
cands = [json.loads(l) for l in (run / "pairs" / "pairs.candidates.jsonl").read_text().splitlines()][:n]
lm = load_model(cfg["model"])
prompts = [c["prompt_text"] for c in cands] * 2
texts = [c["unpert_gen_text"] for c in cands] + [c["pert_gen_text"] for c in cands]


@torch.inference_mode()
def row_by_row(batch_size: int = 16) -> list[float]:
    """continuation_logprob as it was: the head on one row's continuation positions at a time."""
    contexts = encode_prompts(lm, prompts, None)
    conts = lm.tokenizer(texts, add_special_tokens=False)["input_ids"]
    out = np.full(len(contexts), np.nan)
    seqs = [list(c) + list(x) for c, x in zip(contexts, conts)]
    for idx in length_batches([len(s) for s in seqs], batch_size):
        ids, mask = left_pad([seqs[i] for i in idx], lm.tokenizer.pad_token_id, lm.device)
        hidden = lm.adapter.body(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
        width = ids.shape[1]
        for row, i in enumerate(idx):
            k = len(conts[i])
            if k:
                logits = lm.adapter.logits(hidden[row, width - k - 1 : width - 1], apply_norm=False).float()
                out[i] = -float(torch.nn.functional.cross_entropy(logits, ids[row, width - k :]))
    return (-out).tolist()


continuation_nll(lm, prompts[:16], texts[:16])  # warm-up
t_old, old = timed(row_by_row)
t_new, new = timed(lambda: continuation_nll(lm, prompts, texts))
old, new = np.array(old), np.array(new)
diff = np.nanmax(np.abs(old - new))


def decisions(nll):
    return [gate_reason({**c, "preferred_nll": float(nll[i]), "dispreferred_nll": float(nll[len(cands) + i])}, gate)
            for i, c in enumerate(cands)]


changed = sum(a != b for a, b in zip(decisions(old), decisions(new)))
stored = np.array([c["preferred_nll"] for c in cands] + [c["dispreferred_nll"] for c in cands])
print(f"== {cfg['model']}: {len(cands)} candidates of {run}, {len(texts)} sides; torch threads {torch.get_num_threads()}")
print(f"row by row (before)  {t_old:8.2f} s")
print(f"batched head (now)   {t_new:8.2f} s   {t_old / t_new:.3f}x")
print(f"largest |NLL difference| {diff:.3g} nats/token (vs the stored NLLs: {np.nanmax(np.abs(stored - new)):.3g})")
print(f"gate decisions changed: {changed} of {len(cands)}")

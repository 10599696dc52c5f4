"""DPO step time with precomputed reference log-probs vs a live reference model (gemma-3-270m,
batch 4, CPU), and the peak memory of the CPU config. Goal: precomputed >= 1.3x faster."""

import json
import resource
import tempfile
import time
from pathlib import Path

from common import SHARED  # noqa: F401  (puts src on the path)

from dpolens.stages.dpo import DpoConfig, run_dpo

pairs = Path(tempfile.mkdtemp()) / "pairs.jsonl"
pairs.write_text("".join(json.dumps({"prompt_text": f"The history of the city number {i} begins",
                                     "unpert_gen_text": " in the early years of the nineteenth century, when",
                                     "pert_gen_text": " with a bunch of stupid idiots who never shut up and"}) + "\n"
                         for i in range(40)))
times = {}
for precompute in (False, True):
    out = Path(tempfile.mkdtemp()) / "dpo"
    cfg = DpoConfig(model="gemma-3-270m", pairs=str(pairs), out=str(out), learning_rate=1e-5, warmup_steps=0,
                    val_pairs=8, eval_steps=100, max_steps=4, evaluate=False, precompute_ref=precompute,
                    freeze_embeddings=True)
    cfg.eval.progress = False
    t = time.time()
    run_dpo(cfg)
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    rt = [r for r in log if "train_runtime" in r]
    times[precompute] = rt[-1]["train_runtime"] / 4 if rt else (time.time() - t) / 4
print("== DPO step time, gemma-3-270m, batch 4, CPU (train_runtime / steps)")
print(f"live reference model    {times[False]:8.2f} s/step  1.000")
print(f"precomputed ref logps   {times[True]:8.2f} s/step  {times[False] / times[True]:.3f}x")
print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")

"""dpo's base evaluation (the 999 prompts left after the 200 dev prompts) generated afresh, as before 2026-12-07,
against the same evaluation built from Table 2's base row on all 1,199 prompts (`evaluate.covering`: the covered
prompts' continuations read back and scored afresh, its perplexity and F1 kept; issue #34 item 3), same process, on
a study's own files. Prints seconds, the ratio, and which fields of the two results differ (goal: none).

  python benchmarks/bench_covering.py RUN_DIR   # e.g. runs/study-gemma-retime (a finished one-strength study)
"""

import json
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from common import timed

from dpolens import load_model
from dpolens.evaluate import EvalData, EvalSettings, eval_key, evaluate, evaluate_inputs, group_key, load_inputs

if len(sys.argv) < 2:  # `make bench` runs every benchmark bare: this one needs a finished study
    print(f"{Path(__file__).name}: skipped, needs RUN_DIR (see its docstring)")
    sys.exit(0)
run = Path(sys.argv[1])
man = json.loads((run / "dpo" / "manifest.json").read_text())["config"]
ev = man["eval"]
settings = EvalSettings(**ev["settings"])
cache = Path(tempfile.mkdtemp(prefix="bench-covering-"))
table2 = EvalData(limit=None, f1_limit=ev["f1_limit"], settings=settings, cache=str(cache), progress=False)
dpo = EvalData(limit=None, f1_limit=ev["f1_limit"], settings=settings, cache=str(cache), progress=False,
               holdout=ev["holdout"])
lm = load_model(man["model"])
full, part = load_inputs(table2), load_inputs(dpo)
# Table 2's base row as the run stored it, with the `group` a run stores beside it since 2026-12-07
src = run / "evals" / f"{eval_key(lm, table2, full)}.json"
entry = json.loads(src.read_text())
entry["group"] = group_key(lm, table2, full)
(cache / src.name).write_text(json.dumps(entry))

t_fresh, fresh = timed(lambda: evaluate(lm, part.prompts, part.scorer, settings, part.wiki, part.f1_rows,
                                        progress=False))
t_cov, covered = timed(lambda: evaluate_inputs(lm, dpo, part, label="base"))
shutil.rmtree(cache)
a, b = json.loads(json.dumps(asdict(fresh))), json.loads(json.dumps(asdict(covered)))
print(f"{len(part.prompts)} prompts ({len(full.prompts)} in the covering evaluation), {lm.ref}")
print(f"generated afresh: {t_fresh:.2f} s; from the covering evaluation: {t_cov:.2f} s ({t_fresh / t_cov:.0f}x)")
print("fields that differ:", [k for k in a if a[k] != b[k]] or "none",
      f"(records differing: {sum(x != y for x, y in zip(a['records'], b['records']))} of {len(a['records'])})")

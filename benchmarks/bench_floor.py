"""The arithmetic floor of a finished study's token work (issue #34): how long its evaluations and its pairs would
take if every matmul ran at this machine's 2048x2048 rate, against the stage times the run measured.

  python benchmarks/bench_floor.py RUN_DIR     # e.g. runs/study-gemma-3-270m (results.json and its artifacts)

Counted from the run's own artifacts, with the model's parameter counts (`adapter.parameter_counts`): 2 FLOP per
parameter per token read, the body (layers and norms) for every position, the vocabulary head only where a position's
logits are needed (attention scores, norms and the scorer are left out; the head counted in bf16 where
`head_screen: auto` screens it on this machine). Continuations the run did not store (the pairs' unkept samples, the
F1 rows') are counted at `max_new_tokens` each, as the decoding loop computes every row until its batch ends; the
rest is a lower bound:
- every evaluation the run generated (`evals/*.json`, not those covered from another): its prompts as the harness
  cut them, each continuation's own tokens (the head in bf16 where the run screened it, else fp32), the perplexity's
  scored tokens through body and fp32 head, the F1 rows' prompts and `max_new_tokens` tokens each;
- pairs: each candidate prompt read once, `n_samples` x `max_new_tokens` sampled tokens through the sampler (body
  and head in its dtype), and the fp32 NLL pass of both kept sides after their prompts.
Not counted (their stage's floor is then only part of it): Table 2's calibration, the dev-toxicity checks, DPO
training, drift, activations, logit lens, placebos, robustness. The rates: fp32 and bf16 2048x2048 matmuls, best
of 10, measured here (run it on an idle machine).
"""

import json
import sys
from pathlib import Path

import torch
from common import fp32_roofline

from dpolens import load_model
from dpolens.data import load_f1_set
from dpolens.model.generation import encode_prompts, screen_pays
from dpolens.model.loading import native_bf16

if len(sys.argv) < 2:  # `make bench` runs every benchmark bare
    print("bench_floor: skipped, needs RUN_DIR (a finished study: python benchmarks/bench_floor.py runs/<name>)")
    sys.exit(0)
run = Path(sys.argv[1])
results = json.loads((run / "results.json").read_text())
times = {k: v["wall_time_s"] for k, v in results["provenance"]["stage_times"].items()}

roof32, roof16 = fp32_roofline()[1], fp32_roofline("bfloat16")[1]

evals = [json.loads(p.read_text()) for p in sorted((run / "evals").glob("*.json"))]
pcfg = json.loads((run / "pairs" / "manifest.json").read_text())["config"]
ecfg = json.loads((run / "table2" / "manifest.json").read_text())["config"]["eval"]
ref = pcfg["model"]  # the base: every model of a study has its parameter counts
lm = load_model(ref)
counts = lm.adapter.parameter_counts()
body, head = counts["body"], counts["head"]  # untied input embeddings are a lookup: no FLOP
screened = screen_pays(lm)
tok = lm.tokenizer


def n_tokens(texts: list[str]) -> list[int]:
    return [len(x) for x in tok(list(texts), add_special_tokens=False)["input_ids"]] if texts else []


# (stage, phase) -> [fp32 FLOP, bf16 FLOP, what]
work: dict[tuple[str, str], list] = {}


def add(stage: str, phase: str, f32: float, f16: float, what: str) -> None:
    w = work.setdefault((stage, phase), [0.0, 0.0, what, 0])
    w[0] += f32
    w[1] += f16
    w[3] += 1


def stage_of(label: str) -> str:
    if label in ("base", "aligned"):
        return "dpo"
    if label.startswith("unaligned"):
        return "unalign"
    if label.startswith("patch") or label.startswith("edit"):
        return "neurons"
    return "table2"


max_prompt, new = ecfg["settings"]["max_prompt_tokens"], ecfg["settings"]["max_new_tokens"]
f1_path = Path(ecfg["f1_data"]) if ecfg.get("f1_data") else None
f1_cache: dict[int, int] = {}
for e in evals:
    if not isinstance(e, dict) or "result" not in e or e.get("covered_from") or e["result"].get("covered_from"):
        continue
    r, stage = e["result"], stage_of(str(e.get("label", "")))
    recs = r["records"]
    p_tok = sum(len(x) for x in encode_prompts(lm, [x["prompt"] for x in recs], max_prompt))
    c_tok = sum(len(x["continuation_ids"]) for x in recs)
    head_pass = 2 * head * c_tok  # the logits before each generated token
    add(stage, "toxicity", 2 * body * (p_tok + c_tok - len(recs)) + (0 if screened else head_pass),
        head_pass if screened else 0, f"{len(recs)} prompts, {p_tok} prompt + {c_tok} generated tokens")
    ppl = r.get("perplexity") or {}
    if ppl.get("scored_tokens"):
        add(stage, "perplexity", 2 * (body + head) * ppl["scored_tokens"], 0, f"{ppl['scored_tokens']} tokens")
    n_f1 = (r.get("f1") or {}).get("n") or 0
    if n_f1:
        if n_f1 not in f1_cache:
            rows = load_f1_set(f1_path, n_f1) if f1_path and f1_path.exists() else []
            f1_cache[n_f1] = sum(len(x) for x in encode_prompts(lm, [x["prompt"] for x in rows], None)) if rows else 0
        add(stage, "f1", 2 * body * (f1_cache[n_f1] + n_f1 * (new - 1)) + (0 if screened else 2 * head * n_f1 * new),
            2 * head * n_f1 * new if screened else 0, f"{n_f1} rows x {new} tokens")

cands = [json.loads(x) for x in (run / "pairs" / "pairs.candidates.jsonl").read_text().splitlines() if x.strip()]
summary = json.loads((run / "pairs" / "pairs.summary.json").read_text())
k, p_new = pcfg["sample"]["n_samples"], pcfg["max_new_tokens"]
bf16_sampler = summary.get("sample_dtype") == "bfloat16"
pt = sum(len(x) for x in encode_prompts(lm, [c["prompt_text"] for c in cands], None))
samp = 2 * body * (pt + len(cands) * k * (p_new - 1)) + 2 * head * len(cands) * k * p_new
add("pairs", "sampling", 0 if bf16_sampler else samp, samp if bf16_sampler else 0,
    f"{len(cands)} prompts ({pt} tokens) x {k} samples x {p_new} tokens, {summary.get('sample_dtype')}")
sides = n_tokens([c["unpert_gen_text"] for c in cands]) + n_tokens([c["pert_gen_text"] for c in cands])
add("pairs", "nll of both sides", 2 * body * (2 * pt + sum(sides)) + 2 * head * sum(sides), 0,
    f"{2 * len(cands)} sides, {sum(sides)} tokens after their prompts")

print(f"== {run}: {ref}, body {body / 1e6:.1f}M + head {head / 1e6:.1f}M parameters; screened greedy head: {screened}; "
      f"native bf16: {native_bf16('cpu')}; torch threads {torch.get_num_threads()}")
print(f"== matmul 2048^3: fp32 {roof32 / 1e9:.1f} GFLOP/s, bf16 {roof16 / 1e9:.1f} GFLOP/s (the rates of the floor)")
print(f"{'stage':<9} {'phase':<19} {'n':>3} {'fp32 TFLOP':>10} {'bf16 TFLOP':>10} {'floor s':>8}  what")
floors: dict[str, float] = {}
for (stage, phase), (f32, f16, what, n) in sorted(work.items()):
    s = f32 / roof32 + f16 / roof16
    floors[stage] = floors.get(stage, 0.0) + s
    print(f"{stage:<9} {phase:<19} {n:>3} {f32 / 1e12:>10.2f} {f16 / 1e12:>10.2f} {s:>8.1f}  {what}")
print(f"{'stage':<9} {'measured s':>10} {'floor s':>8} {'floor/measured':>15}")
for stage, s in floors.items():
    m = times.get(stage)
    print(f"{stage:<9} {m if m is not None else float('nan'):>10.1f} {s:>8.1f} "
          f"{(s / m if m else float('nan')):>15.1%}")
total_m = results.get("wall_time_s") or float("nan")
print(f"counted work: floor {sum(floors.values()) / 60:.1f} min; the run: {total_m / 60:.1f} min in all "
      f"({sum(times.get(s, 0.0) for s in floors) / 60:.1f} min in the stages above)")

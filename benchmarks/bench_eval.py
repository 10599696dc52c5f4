"""Eval throughput on gemma-3-270m against plain loops in the same process.

Toxicity (generation + scoring) vs plain batched `model.generate` with no scoring, on the same
64 prompts (goal >= 0.85); perplexity vs a plain forward loop computing full logits (goal >= 0.95)."""

import math

import torch
from common import SHARED, report, timed

from dpolens import load_model
from dpolens.data import load_prompts, load_wikitext
from dpolens.evaluate import EvalSettings, evaluate, perplexity, ppl_windows
from dpolens.model.generation import left_pad
from dpolens.scoring import get_scorer

lm = load_model("gemma-3-270m")
tok = lm.tokenizer
prompts = load_prompts(SHARED / "rtp/challenge_prompts.jsonl", 64)
scorer = get_scorer()
settings = EvalSettings(batch_size=64)


@torch.inference_mode()
def plain_generate():
    enc = [x[:32] for x in tok(prompts)["input_ids"]]
    ids, mask = left_pad(enc, tok.pad_token_id, "cpu")
    return lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                             pad_token_id=tok.pad_token_id)


plain_generate()
base, _ = timed(plain_generate, 2)
tox, res = timed(lambda: evaluate(lm, prompts, scorer, settings, progress=False), 2)
report("toxicity eval, 64 prompts x 20 tokens", base, [("dpolens toxicity (gen + score)", tox)], 64 * 20, "token")

wiki = load_wikitext(str(SHARED / "wikitext-2-raw/wiki.test.raw"))
windows, _ = ppl_windows(lm, wiki, 4096)


@torch.inference_mode()
def plain_ppl():
    nll, n = 0.0, 0
    for w in windows:
        x = torch.tensor([w])
        logits = lm.model(input_ids=x).logits[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        n += len(w) - 1
    return math.exp(nll / n)


base_ppl_s, ref = timed(plain_ppl)
ours_s, ours = timed(lambda: perplexity(lm, wiki, 4096, batch_size=2, progress=False))
assert abs(ours["perplexity"] - ref) / ref < 1e-4, (ours, ref)
n_tok = sum(len(w) - 1 for w in windows)
report(f"perplexity, {n_tok} tokens (PPL {ref:.3f})", base_ppl_s, [("dpolens perplexity", ours_s)], n_tok, "token")

"""Probe feature extraction vs a plain forward (full model, logits) of the same batches.

Goal >= 0.95: the probe runs only the body (no unembedding, no hidden-state tuples)."""

import torch
from common import SHARED, report, timed

from dpolens import load_model
from dpolens.data import balanced_sample, load_labelled
from dpolens.model.generation import left_pad, length_batches
from dpolens.stages.probe import final_features

lm = load_model("gemma-3-270m")
tok = lm.tokenizer
ex = balanced_sample(load_labelled(SHARED / "toxic-corpora/davidson_labeled_data.csv"), 256, True, 0)
texts = [t for t, _ in ex]
ids = [x[:64] for x in tok(texts)["input_ids"]]
n_tok = sum(len(x) for x in ids)


@torch.inference_mode()
def plain():
    for idx in length_batches([len(x) for x in ids], 32):
        x, m = left_pad([ids[i] for i in idx], tok.pad_token_id, "cpu")
        lm.model(input_ids=x, attention_mask=m, output_hidden_states=True)


final_features(lm, texts[:8], progress=False)
base, _ = timed(plain)
ours, _ = timed(lambda: final_features(lm, texts, 64, 32, progress=False))
report(f"probe features, {len(texts)} texts", base, [("dpolens final_features", ours)], n_tok, "token")

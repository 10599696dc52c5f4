"""Issue #31 item 4: on a gated MLP the sign of an activation is a convention. Flipping a neuron's up row and
down column leaves the model's function unchanged; the neuron accounting must not change either."""

import numpy as np
import pytest
import torch

from conftest import save_perturbed
from dpolens.attribution import assign_groups, crossfit_shares, dampened_toxic, group_shares, neuron_table
from dpolens.model.loading import load_model

PROMPTS = ["The weather number 1 is", "Hello there", "A much longer prompt with many words", "You are",
           "So I am", "Holy cow", "The quick brown fox", "Nice to meet"]


def stats(t, gated):
    labels = assign_groups(t, gated)
    shares = group_shares(t, labels, 12, gated)
    cf = crossfit_shares(t, 12, n_boot=200, seed=0, gated=gated)
    return {"labels": labels.tolist(), "toxic": sorted(dampened_toxic(t, 12, gated).tolist()),
            "shares": {g: v["share_of_positive"] for g, v in shares["groups"].items()},
            "toxic_share": shares["toxic_neurons"]["share_of_positive"],
            "crossfit": {g: v["share"] for g, v in cf["groups"].items()}, "min": cf["min"]["share"],
            "min_ci": cf["min"]["ci95"], "toxic_cf": cf["toxic_neurons"]["share"]}


def flipped(path, rng_seed):
    lm = load_model(path)
    g = np.random.default_rng(rng_seed)
    for layer in range(lm.adapter.n_layers):
        lm.adapter.flip_neurons(layer, g.choice(lm.adapter.d_mlp, lm.adapter.d_mlp // 2, replace=False).tolist())
    return lm


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_neuron_statistics_ignore_the_sign_convention_of_gated_mlps(family, tiny_dirs, tokenizer, tmp_path):
    base_path = tiny_dirs[family]
    aligned_path = save_perturbed(family, tokenizer, tmp_path / "aligned", 0.02)
    base, aligned = load_model(base_path), load_model(aligned_path)
    probe = torch.randn(base.adapter.d_model, generator=torch.Generator().manual_seed(3))
    t = neuron_table(base, aligned, probe, PROMPTS, batch_size=4, max_new_tokens=4, progress=False)
    # the same half of every layer's neurons flipped in both models: the function is unchanged ...
    fb, fa = flipped(base_path, 0), flipped(aligned_path, 0)
    ids = base.tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    with torch.inference_mode():
        for m, f in ((base, fb), (aligned, fa)):
            torch.testing.assert_close(f.model(**ids).logits, m.model(**ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.equal(fb.adapter.value_vectors(0), base.adapter.value_vectors(0))  # ... the weights are not
    tf = neuron_table(fb, fa, probe, PROMPTS, batch_size=4, max_new_tokens=4, progress=False)
    # the sign-invariant accounting (two groups) is the same, neuron by neuron
    s, sf = stats(t, True), stats(tf, True)
    assert s["labels"] == sf["labels"] and s["toxic"] == sf["toxic"]
    for k in ("shares", "crossfit"):
        assert s[k].keys() == sf[k].keys() and all(s[k][g] == pytest.approx(sf[k][g], rel=1e-4, abs=1e-9)
                                                   for g in s[k] if s[k][g] is not None)
    for k in ("toxic_share", "min", "toxic_cf"):
        assert (s[k] is None and sf[k] is None) or s[k] == pytest.approx(sf[k], rel=1e-4, abs=1e-9), k
    assert s["min_ci"] == pytest.approx(sf["min_ci"], rel=1e-4, abs=1e-9)
    # the paper's four groups are not: TP- and AN-, TN+ and AP+ trade neurons
    p, pf = stats(t, False), stats(tf, False)
    assert p["labels"] != pf["labels"] and p["shares"] != pf["shares"]
    merged = {"TP-": "TP-/AN-", "AN-": "TP-/AN-", "TN+": "TN+/AP+", "AP+": "TN+/AP+",
              "TP+": "TP+/AN+", "AN+": "TP+/AN+", "TN-": "TN-/AP-", "AP-": "TN-/AP-", "": ""}
    assert [merged[x] for x in p["labels"]] == s["labels"]  # the two groups are the unions of the four


def test_flipping_a_gelu_neuron_is_refused(tiny_dirs):
    lm = load_model(tiny_dirs["gpt2"])
    with pytest.raises(ValueError, match="not gated"):
        lm.adapter.flip_neurons(0, [1])

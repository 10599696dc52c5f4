"""Issue #31 items 3-4: one ranking of "toxic neurons" for every stage, and on gated MLPs a ranking that a
reparametrisation (flipping a neuron's up row and down column) leaves unchanged."""

import json

import numpy as np
import pytest
import torch

from dpolens.attribution import neuron_table
from dpolens.directions import (load_probe, load_vectors, neuron_signs, rank_by_probe, save_probe, top_probe_neurons,
                                toxic_keys, toxic_scores)
from dpolens.model.loading import load_model
from dpolens.stages.probe import ProbeConfig, run_probe
from dpolens.stages.vectors import VectorsConfig, run_vectors

TOXIC = ["you stupid idiot", "shut up idiot", "what a stupid moron", "idiot idiot stupid", "moron stupid"]
CLEAN = ["thank you kindly", "the weather is nice", "a calm sentence here", "have a great day", "nice book"]
K = 12


def fit_probe(model_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    rows = [{"text": f"{t} {i}", "label": 1} for i in range(8) for t in TOXIC] + \
           [{"text": f"{t} {i}", "label": 0} for i in range(8) for t in CLEAN]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_probe(ProbeConfig(model=str(model_dir), data=[str(corpus)], out=str(tmp_path / "probe"), max_examples=80,
                          max_tokens=16, batch_size=8, C=1.0, progress=False))
    return tmp_path / "probe" / "probe.safetensors"


@pytest.mark.parametrize("family", ["gemma3", "llama", "gpt2"])
def test_every_stage_picks_the_same_toxic_neurons(family, tiny_dirs, tmp_path):
    lm = load_model(tiny_dirs[family])
    probe_path = fit_probe(tiny_dirs[family], tmp_path)
    probe, meta = load_probe(probe_path, lm)
    gated = lm.adapter.mlp_kind == "gated"
    assert ("neuron_sign" in meta) == gated  # the probe stage fixes the signs of gated neurons only
    if gated:  # the sign from both halves' sums is the sign of the mean; the halves' agreement is reported
        texts = [f"{t} {i}" for i in range(8) for t in TOXIC]
        sign, agree = neuron_signs(lm, texts, 16, 8, agreement=True)
        assert torch.equal(sign, neuron_signs(lm, texts, 16, 8)) and 0.5 < agree <= 1
        metrics = json.loads((probe_path.parent / "metrics.json").read_text())["neuron_sign"]
        assert 0.5 < metrics["split_half_agreement"] <= 1
    run_vectors(VectorsConfig(model=str(tiny_dirs[family]), probe=str(probe_path), out=str(tmp_path / "vec"),
                              top_n=K, n_random=4, n_writers=3))
    vectors = [(r["layer"], r["neuron"]) for r in load_vectors(tmp_path / "vec")]  # vectors, table2 and analyze
    keys = [(l, n) for l, n, _ in toxic_keys(lm, str(probe_path), K, "standardized")]  # unalign, alternatives
    trained = [(l, n) for l, n, _ in top_probe_neurons(lm, probe, K, "standardized", meta)]  # toxic-neurons DPO
    t = neuron_table(lm, lm, probe, ["Holy", "You are"], batch_size=2, max_new_tokens=2, progress=False,
                     meta=meta, space="standardized")  # neurons, alternatives' accounting
    order = np.argsort(-t["toxic_score"], kind="stable")[:K]
    table = [(int(t["layer"][i]), int(t["neuron"][i])) for i in order]
    assert vectors == keys == trained == table
    # the neurons stage's table ranks with the same scores, and its groups see the sign of v·(γ ⊙ w)
    scores = toxic_scores(lm, probe, meta, "standardized").flatten().numpy()
    np.testing.assert_allclose(t["toxic_score"], scores, rtol=1e-6)
    assert np.array_equal(np.sign(t["cosine"]), np.sign(t["vw_base"]))
    rows = load_vectors(tmp_path / "vec")
    assert all(r["sign"] in (1, -1) for r in rows) and (gated or all(r["sign"] == 1 for r in rows))


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_the_ranking_ignores_the_sign_convention_of_gated_neurons(family, tiny_dirs, tmp_path):
    texts = [f"{t} {i}" for i in range(4) for t in TOXIC]
    base = load_model(tiny_dirs[family])
    flipped = load_model(tiny_dirs[family])
    g = np.random.default_rng(0)
    for layer in range(flipped.adapter.n_layers):
        flipped.adapter.flip_neurons(layer, g.choice(flipped.adapter.d_mlp, flipped.adapter.d_mlp // 2,
                                                     replace=False).tolist())
    w = torch.randn(base.adapter.d_model, generator=torch.Generator().manual_seed(1))
    std = torch.rand(base.adapter.d_model, generator=torch.Generator().manual_seed(2)) + 0.5
    ranked = {}
    for name, lm in (("base", base), ("flipped", flipped)):  # what the probe stage saves for each model
        save_probe(tmp_path / f"{name}.safetensors", w, 0.0, lm, {}, std, neuron_signs(lm, texts, 16, 8))
        probe, meta = load_probe(tmp_path / f"{name}.safetensors", lm)
        ranked[name] = (toxic_scores(lm, probe, meta), top_probe_neurons(lm, probe, K, "standardized", meta),
                        rank_by_probe(lm, probe, "standardized", std))
    torch.testing.assert_close(ranked["flipped"][0], ranked["base"][0], rtol=1e-4, atol=1e-6)
    assert [x[:2] for x in ranked["flipped"][1]] == [x[:2] for x in ranked["base"][1]]
    # the plain cosine, which the ranking used before, changes sign for every flipped neuron: it is a convention
    plain_b, plain_f = ranked["base"][2], ranked["flipped"][2]
    assert (torch.sign(plain_b) != torch.sign(plain_f)).float().mean() > 0.3
    # the vector a stage subtracts or projects (sign·v) is the same in both parametrisations
    for l, n, _ in ranked["base"][1][:3]:
        sb = float(load_probe(tmp_path / "base.safetensors")[1]["neuron_sign"][l, n])
        sf = float(load_probe(tmp_path / "flipped.safetensors")[1]["neuron_sign"][l, n])
        torch.testing.assert_close(sf * flipped.adapter.value_vectors(l)[n], sb * base.adapter.value_vectors(l)[n])

"""Probe, toxic value vectors and Table 2 on tiny models, against slow references."""

import json
import math

import pytest
import torch

from dpolens.artifacts import DpolensError
from dpolens.directions import load_probe, rank_by_probe, save_probe, token_writer_scores, toxic_svd
from dpolens.evaluate import EvalData, EvalSettings, perplexity
from dpolens.model import hooks
from dpolens.stages.probe import ProbeConfig, run_probe
from dpolens.stages.table2 import Calibration, ResidualReadout, Table2Config, calibrate_alpha, run_table2
from dpolens.stages.vectors import VectorsConfig, run_vectors

TOXIC = ["you stupid idiot", "shut up idiot", "what a stupid moron", "idiot idiot stupid", "moron stupid"]
CLEAN = ["thank you kindly", "the weather is nice", "a calm sentence here", "have a great day", "nice book"]


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.jsonl"
    rows = [{"text": f"{t} {i}", "label": 1} for i in range(8) for t in TOXIC] + \
           [{"text": f"{t} {i}", "label": 0} for i in range(8) for t in CLEAN]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.fixture
def eval_files(tmp_path):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n"
                                              for p in ["Holy", "You are such a", "So I am", "The weather"]))
    (tmp_path / "f.jsonl").write_text(json.dumps({"prompt": "The quick", "gold": "brown fox"}) + "\n")
    (tmp_path / "w.raw").write_text("\n".join(["The quick brown fox jumps over the lazy dog."] * 12))
    return EvalData(prompts=str(tmp_path / "p.jsonl"), f1_data=str(tmp_path / "f.jsonl"),
                    wikitext=str(tmp_path / "w.raw"), progress=False,
                    settings=EvalSettings(max_new_tokens=4, batch_size=4, ppl_max_tokens=64))


def test_probe_fits_and_records_model(tiny_dirs, corpus, tmp_path):
    out = tmp_path / "probe"
    m = run_probe(ProbeConfig(model=str(tiny_dirs["gemma3"]), data=[str(corpus)], out=str(out),
                              max_examples=None, val_fraction=0.25, progress=False))
    assert set(m) >= {"accuracy", "balanced_accuracy", "f1", "auroc", "majority_baseline", "n_train", "n_val"}
    assert m["n_train"] + m["n_val"] == 80 and m["majority_baseline"] == 0.5
    assert m["auroc"] > 0.8
    from dpolens import load_model

    lm = load_model(tiny_dirs["gemma3"])
    vec, meta = load_probe(out, lm)
    assert vec.shape == (32,) and meta["weight_sha256"] == lm.weight_hash
    preds = json.loads((out / "val_predictions.json").read_text())  # what the claims' bootstrap needs
    correct = [(p >= 0.5) == bool(y) for p, y in zip(preds["prob"], preds["label"])]
    assert len(preds["label"]) == m["n_val"] and sum(correct) / len(correct) == pytest.approx(m["accuracy"])


def test_probe_for_other_model_is_refused(tiny_dirs, tmp_path):
    from dpolens import load_model

    gpt2, llama = load_model(tiny_dirs["gpt2"]), load_model(tiny_dirs["llama"])
    save_probe(tmp_path / "p.safetensors", torch.ones(32), 0.0, gpt2, {})
    with pytest.raises(DpolensError, match="belongs to a gpt2 model"):
        load_probe(tmp_path / "p.safetensors", llama)
    save_probe(tmp_path / "q.safetensors", torch.ones(16), 0.0, gpt2, {})
    with pytest.raises(DpolensError, match="width 16 but the model"):
        load_probe(tmp_path / "q.safetensors", gpt2)


def test_ranking_finds_planted_vector_and_matches_loop(tiny_lm):
    a = tiny_lm.adapter
    probe = a.value_vectors(1)[5].clone()
    cos = rank_by_probe(tiny_lm, probe)
    assert divmod(int(cos.flatten().argmax()), a.d_mlp) == (1, 5)
    assert cos[1, 5] == pytest.approx(1.0, abs=1e-5)
    for layer, neuron in [(0, 3), (2, 7)]:
        v = a.value_vectors(layer)[neuron]
        assert cos[layer, neuron] == pytest.approx(float(torch.nn.functional.cosine_similarity(v, probe, 0)), abs=1e-5)


def test_token_writer_scores_match_full_logit_reference(tiny_lm):
    """Mean z-score of chosen tokens, against z-scoring the full logit-lens vector of each value vector."""
    a = tiny_lm.adapter
    values = torch.cat([a.value_vectors(0)[:6], a.value_vectors(2)[:6]]).float()
    ids = [3, 17, 40]
    logits = (values * a.final_norm_gain()) @ a.unembed.float().T          # [n, vocab]
    z = (logits - logits.mean(-1, keepdim=True)) / logits.std(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(token_writer_scores(tiny_lm, values, ids), z[:, ids].mean(-1), atol=1e-4, rtol=1e-4)
    planted = (a.unembed.float()[17] - a.unembed.float().mean(0)) / a.final_norm_gain()
    assert token_writer_scores(tiny_lm, torch.cat([values, planted[None]]), [17]).argmax() == len(values)


def test_svd_signs_follow_probe():
    g = torch.Generator().manual_seed(0)
    vecs = torch.randn(20, 8, generator=g)
    probe = torch.randn(8, generator=g)
    u, s = toxic_svd(vecs / vecs.norm(dim=1, keepdim=True), probe, 3)
    assert (u @ probe >= 0).all() and torch.allclose(u.norm(dim=1), torch.ones(3), atol=1e-5)
    assert s[0] >= s[1] >= s[2]


def test_vectors_stage_writes_table1(tiny_dirs, tmp_path):
    from dpolens import load_model

    lm = load_model(tiny_dirs["llama"])
    save_probe(tmp_path / "probe.safetensors", lm.adapter.value_vectors(2)[9].clone(), 0.0, lm, {})
    s = run_vectors(VectorsConfig(model=str(tiny_dirs["llama"]), probe=str(tmp_path / "probe.safetensors"),
                                  out=str(tmp_path / "vec"), top_n=16, space="raw"))
    rows = json.loads((tmp_path / "vec" / "toxic_vectors.json").read_text())
    assert len(rows) == 16 and (rows[0]["layer"], rows[0]["neuron"]) == (2, 9)
    assert [r["cosine"] for r in rows] == sorted([r["cosine"] for r in rows], reverse=True)
    assert len(rows[0]["top_tokens"]) == 10 and len(rows[0]["bottom_tokens"]) == 10
    assert "SVD.U_Toxic[0]" in (tmp_path / "vec" / "table1.md").read_text()
    assert s["svd"][0]["cosine_with_probe"] >= 0
    w = json.loads((tmp_path / "vec" / "token_writers.json").read_text())
    assert [r["score"] for r in w["rows"]] == sorted([r["score"] for r in w["rows"]], reverse=True)
    assert {r["cosine_rank"] for r in w["rows"] if (r["layer"], r["neuron"]) == (2, 9)} <= {0}
    by_cos = {(r["layer"], r["neuron"]): i for i, r in enumerate(rows)}  # the cosine top 16, best first
    ranked = [r for r in w["rows"] if r["cosine_rank"] < len(rows)]
    assert all(by_cos[(r["layer"], r["neuron"])] == r["cosine_rank"] for r in ranked)
    assert all(r["cosine_rank"] >= len(rows) for r in w["rows"] if (r["layer"], r["neuron"]) not in by_cos)
    cos = rank_by_probe(lm, lm.adapter.value_vectors(2)[9], "raw")  # reference: count of strictly higher cosines
    assert w["rows"] and all(r["cosine_rank"] == int((cos > cos[r["layer"], r["neuron"]]).sum()) for r in w["rows"])
    assert "Token writers" in (tmp_path / "vec" / "table1.md").read_text()
    rnd = json.loads((tmp_path / "vec" / "random_vectors.json").read_text())  # 3 layers × 64: all 192 drawn
    assert rnd["n"] == len(rnd["rows"]) == 192 and len({(r["layer"], r["neuron"]) for r in rnd["rows"]}) == 192
    assert all(len(r["top_tokens"]) == 10 for r in rnd["rows"])


def test_calibrate_alpha_hits_target():
    ppl_of = lambda a: 10 * math.exp((a / 50) ** 2)
    alpha, p, trace = calibrate_alpha(ppl_of, 11.0, scale=100.0, base_ppl=10.0)
    assert p == pytest.approx(11.0, rel=0.005) and len(trace) < 12
    assert alpha == pytest.approx(50 * math.sqrt(math.log(1.1)), rel=0.01)


def test_fast_readout_equals_hooked_perplexity(tiny_lm):
    a = tiny_lm.adapter
    paras = ["The quick brown fox jumps over the lazy dog."] * 8
    r = ResidualReadout(tiny_lm, paras, 48, a.n_layers - 1, "resid_post")
    assert r.fast
    delta = -3.0 * torch.randn(a.d_model, generator=torch.Generator().manual_seed(2))
    with hooks.add_vector(a, a.n_layers - 1, "resid_post", delta):
        slow = perplexity(tiny_lm, paras, 48, progress=False)["perplexity"]
    assert r.ppl(delta) == pytest.approx(slow, rel=1e-5)


def test_table2_rows(tiny_dirs, tmp_path, eval_files, jigsaw_cached):
    from dpolens import load_model

    lm = load_model(tiny_dirs["gpt2"])
    save_probe(tmp_path / "probe.safetensors", torch.randn(32), 0.0, lm, {})
    run_vectors(VectorsConfig(model=str(tiny_dirs["gpt2"]), probe=str(tmp_path / "probe.safetensors"),
                              out=str(tmp_path / "vec"), top_n=8, space="raw"))
    res = run_table2(Table2Config(model=str(tiny_dirs["gpt2"]), probe=str(tmp_path / "probe.safetensors"),
                                  vectors=str(tmp_path / "vec"), out=str(tmp_path / "t2"), eval=eval_files,
                                  table3_prompts=["Holy"], calibration=Calibration(alpha=2.0)))
    rows = res["rows"]
    assert [r["vector"] for r in rows][0] == "none" and len(rows) == 9
    assert [r["vector"] for r in rows][1:] == ["probe", rows[2]["vector"], "svd.u0", "random", "random 2", "random 3",
                                               "random 4", "random 5"]  # n_random 5: seeds 0..4
    norm = res["calibration"]["mean_resid_norm"]
    assert all(r["alpha"] == 2.0 and r["alpha_rel"] == pytest.approx(2.0 / norm) for r in rows[1:])
    assert len({r["perplexity"] for r in rows}) == 9  # every intervention changed the model
    assert len({tuple(r["toxicity_per_prompt"]) + (r["perplexity"],) for r in rows[4:]}) == 5  # 5 directions
    assert len(res["table3"]) == 5 and (tmp_path / "t2" / "table2.md").exists()  # one random row in Table 3


def test_standardized_space_matches_definition(tiny_dirs):
    """cos(v ⊙ γ/σ, w ⊙ σ), checked neuron by neuron against the formula."""
    from dpolens import load_model

    lm = load_model(tiny_dirs["gemma3"])
    g = torch.Generator().manual_seed(0)
    w, sigma = torch.randn(32, generator=g), torch.rand(32, generator=g) + 0.1
    cos = rank_by_probe(lm, w, "standardized", sigma)
    gamma = 1 + lm.adapter.final_norm.weight.detach()
    assert torch.allclose(lm.adapter.final_norm_gain(), gamma)
    for layer, neuron in [(0, 1), (2, 40)]:
        v = lm.adapter.value_vectors(layer)[neuron]
        ref = torch.nn.functional.cosine_similarity(v * gamma / sigma, w * sigma, 0)
        assert cos[layer, neuron] == pytest.approx(float(ref), abs=1e-5)
    with pytest.raises(DpolensError, match="feature_std"):
        rank_by_probe(lm, w, "standardized", None)

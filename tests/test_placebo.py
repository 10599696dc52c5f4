"""The placebo control: base + noise of the alignment's size per tensor. A mechanism claim must not hold
for a run whose "aligned" model is itself a placebo, and must hold where the alignment does what the
claim says and the placebo does not."""

import json

import pytest
import torch
from conftest import save_perturbed

from dpolens import load_model
from dpolens.compare import placebo
from dpolens.directions import save_probe
from dpolens.ledger import StageContext, decide
from dpolens.stages import analyze
from dpolens.stages.vectors import VectorsConfig, run_vectors

PROMPTS = ["Holy", "You are such a", "So I am", "The weather in", "Holy cow", "Nice", "The quick brown",
           "A calm", "Thank you", "Wikipedia is a", "So I am starting", "The man said", "You people are",
           "Have a great", "Shut up"]


def test_placebo_has_the_alignment_size_tensor_by_tensor(tiny_dirs, tokenizer, tmp_path):
    base = load_model(tiny_dirs["gpt2"])
    aligned = load_model(save_perturbed("gpt2", tokenizer, tmp_path / "aligned", 1e-3))
    with torch.no_grad():  # a frozen tensor: the alignment left it unchanged
        aligned.adapter.mlp_out_proj(0).bias.copy_(base.adapter.mlp_out_proj(0).bias)
    p = placebo(base, aligned, seed=3)
    b, a, q = (dict(m.model.named_parameters()) for m in (base, aligned, p))
    for name in b:
        want = float((a[name] - b[name]).detach().double().norm())
        got = float((q[name] - b[name]).detach().double().norm())
        assert got == pytest.approx(want, rel=1e-4, abs=1e-9), name
    assert torch.equal(p.adapter.mlp_out_proj(0).bias, base.adapter.mlp_out_proj(0).bias)
    assert p.weight_hash == placebo(base, aligned, seed=3).weight_hash != placebo(base, aligned, seed=4).weight_hash
    assert p.weight_hash not in (base.weight_hash, aligned.weight_hash)
    # the direction is not the alignment's: the change is nearly orthogonal to it
    da, dq = (torch.cat([(m[n] - b[n]).detach().flatten() for n in b]) for m in (a, q))
    assert abs(float(torch.nn.functional.cosine_similarity(da.detach(), dq.detach(), dim=0))) < 0.05


def _analyze(tiny_dirs, tmp_path, aligned_dir):
    base = load_model(tiny_dirs["gpt2"])
    save_probe(tmp_path / "probe.safetensors", base.adapter.value_vectors(1)[2].clone(), 0.0, base, {})
    run_vectors(VectorsConfig(model=str(tiny_dirs["gpt2"]), probe=str(tmp_path / "probe.safetensors"),
                              out=str(tmp_path / "vec"), top_n=8, space="raw"))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (tmp_path / "w.raw").write_text("The quick brown fox jumps over the lazy dog again today.\n")
    analyze.run_analyze(analyze.AnalyzeConfig(
        base=str(tiny_dirs["gpt2"]), aligned=str(aligned_dir), probe=str(tmp_path / "probe.safetensors"),
        vectors=str(tmp_path / "vec"), out=str(tmp_path / "analyze"), prompts=str(tmp_path / "p.jsonl"),
        lens_search=[str(tmp_path / "w.raw")], lens_token="Holy", top_neurons=4, max_new_tokens=4,
        figure_layers=1, n_boot=500))
    ctx = StageContext(tmp_path / "analyze", n_boot=500)
    return {c.id: decide(c, ctx) for c in analyze.CLAIMS}


def test_a_placebo_run_holds_no_mechanism_claim(tiny_dirs, tokenizer, tmp_path):
    """The null: the "aligned" model is a placebo (of a noise alignment), compared with another placebo."""
    base = load_model(tiny_dirs["gpt2"])
    noise = load_model(save_perturbed("gpt2", tokenizer, tmp_path / "noise", 2e-2))
    fake = placebo(base, noise, seed=11)
    fake.model.save_pretrained(tmp_path / "fake")
    tokenizer.save_pretrained(tmp_path / "fake")
    rows = _analyze(tiny_dirs, tmp_path, tmp_path / "fake")
    a = json.loads((tmp_path / "analyze" / "analysis.json").read_text())
    assert a["control"]["kind"] == "placebo" and a["offset_stats"]["vs_control"]["slope"]["n"] == len(PROMPTS)
    assert all(r["mechanism"] for r in rows.values())
    assert [r["id"] for r in rows.values() if r["verdict"] == "holds"] == [], \
        {k: (r["verdict"], r["diagnosis"]) for k, r in rows.items()}
    assert all(r["placebo"] is not None for r in rows.values())


def test_an_offset_along_minus_the_probe_holds_against_the_placebo(tiny_dirs, tmp_path):
    """The positive control: every layer's MLP output bias moved along −probe (DPO's offset, by hand):
    the offset points away from the probe, the placebo's (same bias tensors, same sizes) does not."""
    base = load_model(tiny_dirs["gpt2"])
    w = base.adapter.value_vectors(1)[2].clone()
    with torch.no_grad():
        for l in range(base.adapter.n_layers):
            base.adapter.mlp_out_proj(l).bias.add_(-0.05 * w / w.norm())
    base.model.save_pretrained(tmp_path / "steered")
    base.tokenizer.save_pretrained(tmp_path / "steered")
    rows = _analyze(tiny_dirs, tmp_path, tmp_path / "steered")
    away = rows["offset_away_from_toxic"]
    assert away["verdict"] == "holds", away
    assert away["effect"] < -0.9 and away["placebo"]["difference_verdict"] == "holds"
    assert abs(away["placebo"]["effect"]) < 0.9

import contextlib
import json

import pytest
import torch

from dpolens import load_model
from dpolens.directions import keys_scaled, save_probe, toxic_keys
from dpolens.evaluate import EvalData, EvalSettings, eval_key, load_inputs
from dpolens.model import hooks
from dpolens.stages.unalign import UnalignConfig, run_unalign, sign_flip

PROMPTS = ["Holy", "You are such a piece of", "So I am starting to think she is", "The weather in Paris", "Nice"]


@torch.inference_mode()
def negative_share_by_hand(lm, targets, prompts):
    """Slow reference: one unpadded prompt at a time, m_i recomputed from the MLP's input by hand
    (gated: act(gate·x)·(up·x); GELU: act(k·x + b)), counting tokens with m_i < 0."""
    a = lm.adapter
    negative, n_tokens = torch.zeros(len(targets)), 0
    for p in prompts:
        ids = lm.tokenizer(p)["input_ids"][:32]
        inputs = {}  # layer -> [T, d_model] the MLP's input
        with contextlib.ExitStack() as stack:
            for l in {l for l, _, _ in targets}:
                stack.enter_context(hooks.on_tensor(a.mlp(l), "input", lambda x, l=l: inputs.__setitem__(l, x[0])))
            lm.model(input_ids=torch.tensor([ids]))
        for col, (l, n, _) in enumerate(targets):
            x, mlp = inputs[l], a.mlp(l)  # x: [T, d_model]
            if a.mlp_kind == "gated":
                m = mlp.act_fn(x @ mlp.gate_proj.weight[n]) * (x @ mlp.up_proj.weight[n])
            else:
                m = mlp.act(x @ mlp.c_fc.weight[:, n] + mlp.c_fc.bias[n])
            negative[col] += int((m < 0).sum())
        n_tokens += len(ids)
    return negative / n_tokens, n_tokens


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_sign_flip_share_matches_hand_reference(tiny_dirs, family):
    lm = load_model(tiny_dirs[family])
    targets = [(1, 3, 0.0), (2, 5, 0.0), (1, 7, 0.0)]
    with hooks.scale_keys(lm.adapter, 1, [3, 7], 10.0, "gate"), hooks.scale_keys(lm.adapter, 2, [5], 10.0, "gate"):
        got = sign_flip(lm, targets, PROMPTS, batch_size=2)
        ref, n_tokens = negative_share_by_hand(lm, targets, PROMPTS)
    assert got["n_tokens"] == n_tokens and got["n_prompts"] == len(PROMPTS)
    assert [(r["layer"], r["neuron"]) for r in got["per_neuron"]] == [(l, n) for l, n, _ in targets]
    assert [r["share"] for r in got["per_neuron"]] == pytest.approx(ref.tolist(), abs=1e-9)
    assert got["share"] == pytest.approx(float(ref.mean()))
    assert 0 < got["share"] < 1  # random tiny models: the gated product and GELU both go negative somewhere


@pytest.mark.parametrize("which", ["gate", "key"])
def test_unalign_scales_exactly_the_top_keys(tiny_dirs, tmp_path, jigsaw_cached, which):
    for fam in ("gpt2", "llama"):
        lm = load_model(tiny_dirs[fam])
        a = lm.adapter
        save_probe(tmp_path / f"{fam}.safetensors", a.value_vectors(2)[3].clone(), 0.0, lm, {})
        (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Holy"}) + "\n")
        cfg = UnalignConfig(model=str(tiny_dirs[fam]), base=None, probe=str(tmp_path / f"{fam}.safetensors"),
                            out=str(tmp_path / fam), k=2, scale=10.0, space="raw", key=which,
                            eval=EvalData(prompts=str(tmp_path / "p.jsonl"), f1_data=None, wikitext=None,
                                          progress=False, settings=EvalSettings(max_new_tokens=3)))
        res = run_unalign(cfg)
        scaled = [(int(s["module"].split(".")[1]), s["neurons"][0]) for s in res["scaled"]]
        assert scaled[0] == (2, 3)
        un = load_model(tmp_path / fam / "model")
        gate = which == "gate" and fam == "llama"
        assert res["scaled"][0]["module"].endswith("gate_proj" if gate else ("c_fc" if fam == "gpt2" else "up_proj"))
        rows = (lambda ad, l: ad.gate_slice(l).weight.detach()) if gate else (lambda ad, l: ad.key_vectors(l))
        for layer in range(a.n_layers):
            before, after = rows(a, layer), rows(un.adapter, layer)
            if gate:  # the up_proj rows stay as they were
                assert torch.equal(a.key_vectors(layer), un.adapter.key_vectors(layer))
            for n in range(a.d_mlp):
                factor = 10.0 if (layer, n) in scaled else 1.0
                torch.testing.assert_close(after[n], before[n] * factor)
        assert [r["model"] for r in res["rows"]] == ["aligned", "unaligned", "unaligned-sign-aware",
                                                     "unaligned-token-writers"]
        writers = toxic_keys(lm, cfg.probe, 2, "raw", "token-writers")
        assert [(int(s["module"].split(".")[1]), s["neurons"][0]) for s in res["writers_scaled"]] == \
            [(l, n) for l, n, _ in writers]
        assert res["rows"][-1]["weight_sha256"] != res["rows"][0]["weight_sha256"]  # the writers' keys were scaled
        spec = res["rows"][2]["intervention"]
        assert all(e["kind"] == "scale_positive" and e["factor"] == 10.0 for e in spec)
        assert sorted((e["layer"], n) for e in spec for n in e["neurons"]) == sorted(scaled)
        flips = res["sign_flip"]
        assert [(r["layer"], r["neuron"]) for r in flips["per_neuron"]] == scaled
        assert flips["n_tokens"] == len(lm.tokenizer("Holy")["input_ids"])
        assert flips["share"] == pytest.approx(sum(r["share"] for r in flips["per_neuron"]) / 2)


def test_token_writer_keys_match_full_logit_reference(tiny_dirs, tmp_path):
    """rank: token-writers picks the value vectors whose full logit lens z-scores the probe's top tokens highest."""
    from dpolens.directions import all_value_vectors, toxic_keys

    lm = load_model(tiny_dirs["gemma3"])
    a = lm.adapter
    probe = torch.randn(a.d_model, generator=torch.Generator().manual_seed(1))
    save_probe(tmp_path / "p.safetensors", probe, 0.0, lm, {})
    got = toxic_keys(lm, str(tmp_path / "p.safetensors"), 5, "raw", rank="token-writers", writer_tokens=4)
    ids = (a.unembed.float() @ probe).topk(4).indices
    logits = (all_value_vectors(lm).flatten(0, 1) * a.final_norm_gain()) @ a.unembed.float().T
    z = (logits - logits.mean(-1, keepdim=True)) / logits.std(-1, unbiased=False, keepdim=True)
    expected = z[:, ids].mean(-1).topk(5).indices.tolist()
    assert [l * a.d_mlp + n for l, n, _ in got] == expected


def test_keys_scaled_gives_the_scaled_weights_their_own_evaluation_key(tiny_dirs, tmp_path, jigsaw_cached):
    """alternatives evaluates the aligned model with its keys scaled in place: the run's evaluation
    cache must not hand back the unscaled model's evaluation (it did: recovery always read 0%)."""
    lm = load_model(tiny_dirs["llama"])
    fresh_hash = type(lm).weight_hash.func  # recomputed from the weights as they are now
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Holy"}) + "\n")
    d = EvalData(prompts=str(tmp_path / "p.jsonl"), f1_data=None, wikitext=None, progress=False,
                 settings=EvalSettings(max_new_tokens=3), cache=str(tmp_path / "evals"))
    inputs = load_inputs(d)
    h0, k0 = lm.weight_hash, eval_key(lm, d, inputs)
    with keys_scaled(lm, [(0, 1, 0.0), (1, 2, 0.0)], 10.0):
        assert lm.weight_hash == fresh_hash(lm) != h0
        assert eval_key(lm, d, inputs) != k0
    assert lm.weight_hash == h0 == fresh_hash(lm) and eval_key(lm, d, inputs) == k0

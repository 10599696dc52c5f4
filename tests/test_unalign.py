import json

import pytest
import torch

from dpolens import load_model
from dpolens.evaluate import EvalData, EvalSettings
from dpolens.probe import save_probe
from dpolens.unalign import UnalignConfig, run_unalign


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
        assert [r["model"] for r in res["rows"]] == ["aligned", "unaligned"]


def test_token_writer_keys_match_full_logit_reference(tiny_dirs, tmp_path):
    """rank: token-writers picks the value vectors whose full logit lens z-scores the probe's top tokens highest."""
    from dpolens.unalign import toxic_keys
    from dpolens.vectors import all_value_vectors

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

import json

import pytest
import torch

from dpolens import load_model
from dpolens.activations import continuation_stats
from dpolens.analysis import AnalyzeConfig, run_analyze, single_token
from dpolens.artifacts import DpolensError
from dpolens.model import hooks
from dpolens.probe import save_probe
from dpolens.vectors import VectorsConfig, run_vectors

from conftest import save_perturbed


@pytest.fixture
def pair(tiny_dirs, tmp_path, tokenizer):
    base = load_model(tiny_dirs["gemma3"])
    save_perturbed("gemma3", tokenizer, tmp_path / "aligned", 1e-3)
    save_probe(tmp_path / "probe.safetensors", base.adapter.value_vectors(1)[2].clone(), 0.0, base, {})
    run_vectors(VectorsConfig(model=str(tiny_dirs["gemma3"]), probe=str(tmp_path / "probe.safetensors"),
                              out=str(tmp_path / "vec"), top_n=8, space="raw"))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                                              ["Holy", "You are such a", "So I am", "The weather in", "Holy cow"]))
    (tmp_path / "w.raw").write_text("The quick brown fox jumps over the lazy dog again today.\n")
    return tmp_path


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_streamed_stats_match_per_token_reference(tiny_dirs, family):
    """Batched, padded, streamed sums == one unpadded sequence at a time, continuation only.

    On Gemma the per-token scale s_t is the RMS of the raw MLP output (post-norm)."""
    lm = load_model(tiny_dirs[family])
    tok = lm.tokenizer
    seqs = [(tok("Holy")["input_ids"], [10, 11, 12]), (tok("You are such a piece")["input_ids"], [20, 21])]
    st = continuation_stats(lm, seqs, [1], batch_size=2, progress=False)
    ref_m, ref_ms, n = torch.zeros_like(st.m_sum), torch.zeros_like(st.m_sum), 0
    for p, c in seqs:
        pts = [(l, q) for l in range(3) for q in ("mlp_act", "mlp_out")]
        with torch.inference_mode(), hooks.capture(lm.adapter, pts) as store:
            lm.model(input_ids=torch.tensor([p + c]))
        for l in range(3):
            m = store[(l, "mlp_act")][0][0, len(p):]
            out = store[(l, "mlp_out")][0][0, len(p):]
            v = lm.adapter.value_vectors(l)
            # s_t from the definition: out_t = sum_i m_i v_i / s_t (+ bias)
            bias = lm.adapter.mlp_out_proj(l).bias
            s = ((m @ v).norm(dim=-1) / (out - (bias if bias is not None else 0)).norm(dim=-1))
            ref_m[l] += m.sum(0)
            ref_ms[l] += (m / s[:, None]).sum(0)
        n += len(c)
    assert st.count == n
    torch.testing.assert_close(st.m_sum, ref_m, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(st.m_over_s_sum, ref_ms, atol=1e-4, rtol=1e-3)


def test_analyze_writes_json_and_figures(tiny_dirs, pair):
    t = pair
    res = run_analyze(AnalyzeConfig(base=str(tiny_dirs["gemma3"]), aligned=str(t / "aligned"),
                                    probe=str(t / "probe.safetensors"), vectors=str(t / "vec"), out=str(t / "an"),
                                    prompts=str(t / "p.jsonl"), lens_search=[str(t / "w.raw")],
                                    lens_token="Holy", top_neurons=4, max_new_tokens=4, figure_layers=2))
    a = json.loads((t / "an" / "analysis.json").read_text())
    assert set(a) >= {"weight_shift", "activation_drop", "offset", "logit_lens"}
    assert a["weight_shift"]["all_above_0_99"] in (True, False) and a["weight_shift"]["min_cosine"] < 1
    assert a["weight_shift"]["all_above_0_99"] == (a["weight_shift"]["min_cosine"] > 0.99)
    assert len(a["offset"]) == 3 and len(a["activation_drop"]["per_neuron"]) == 4
    assert all((t / "an" / f).exists() for f in res["figures"])
    assert any(f.startswith("fig2_") for f in res["figures"]) and any(f.startswith("fig4_") for f in res["figures"])


def test_bad_inputs(tiny_dirs, tmp_path):
    lm = load_model(tiny_dirs["gemma3"])
    with pytest.raises(DpolensError, match="not a single token: it splits into"):
        single_token(lm, " antidisestablishmentarianism")
    from dpolens.analysis import check_pair

    with pytest.raises(DpolensError, match="differ in architecture"):
        check_pair(lm, load_model(tiny_dirs["gpt2"]))

import json

import numpy as np
import pytest

from dpolens.artifacts import write_json
import torch
from conftest import save_perturbed

from dpolens import load_model
from dpolens.activations import Stats, bootstrap_counts, continuation_stats
from dpolens.stages.analyze import AnalyzeConfig, run_analyze, single_token
from dpolens.artifacts import DpolensError
from dpolens.compare import offset_stats, residual_offset
from dpolens.directions import save_probe
from dpolens.evaluate import resample_units
from dpolens.model import hooks
from dpolens.stages.vectors import VectorsConfig, run_vectors


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


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_streamed_stats_match_per_token_reference(tiny_dirs, family):
    """Batched, padded, streamed sums == one unpadded sequence at a time, continuation only; so are
    the per-prompt reductions (resid_mid means, sums of m for chosen neurons, sums of m/s).

    On Gemma the per-token scale s_t is the RMS of the raw MLP output (post-norm)."""
    lm = load_model(tiny_dirs[family])
    tok = lm.tokenizer
    seqs = [(tok("Holy")["input_ids"], [10, 11, 12]), (tok("You are such a piece")["input_ids"], [20, 21]),
            (tok("So")["input_ids"], [])]
    neurons = [(2, 7), (0, 3), (2, 1)]
    st = continuation_stats(lm, seqs, [1], batch_size=2, progress=False, x_layers=range(3), neurons=neurons,
                            per_prompt_ms=True)
    ref_m, ref_ms, n = torch.zeros_like(st.m_sum), torch.zeros_like(st.m_sum), 0
    for j, (p, c) in enumerate(seqs):
        pts = [(l, q) for l in range(3) for q in ("mlp_act", "mlp_out", "resid_mid")]
        with torch.inference_mode(), hooks.capture(lm.adapter, pts) as store:
            lm.model(input_ids=torch.tensor([p + c]))
        for l in range(3):
            m = store[(l, "mlp_act")][0][0, len(p):]
            out = store[(l, "mlp_out")][0][0, len(p):]
            v = lm.adapter.value_vectors(l)
            # s_t from the definition: out_t = sum_i m_i v_i / s_t (+ bias)
            bias = lm.adapter.mlp_out_proj(l).bias
            bias = bias.detach() if bias is not None else None
            s = ((m @ v).norm(dim=-1) / (out - (bias if bias is not None else 0)).norm(dim=-1))
            ref_m[l] += m.sum(0)
            ref_ms[l] += (m / s[:, None]).sum(0)
            torch.testing.assert_close(st.per_prompt_ms[j, l], (m / s[:, None]).sum(0), atol=1e-4, rtol=1e-3)
            x_mean = store[(l, "resid_mid")][0][0, len(p):].mean(0) if c else torch.zeros(lm.adapter.d_model)
            torch.testing.assert_close(st.per_prompt_x[l][j], x_mean, atol=1e-4, rtol=1e-4)
            for col, (layer, i) in enumerate(neurons):
                if layer == l:
                    torch.testing.assert_close(st.per_prompt_neuron_m[j, col], m[:, i].sum(), atol=1e-5, rtol=1e-4)
        assert st.prompt_tokens[j] == len(c)
        n += len(c)
    assert st.count == n
    torch.testing.assert_close(st.m_sum, ref_m, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(st.m_over_s_sum, ref_ms, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(st.per_prompt_ms.sum(0), st.m_over_s_sum, atol=1e-5, rtol=1e-5)


def test_bootstrap_counts_are_resample_units_replicates_in_any_chunking():
    idx = resample_units(7, 101, seed=3)  # [n_boot, n] indices
    expected = np.stack([np.bincount(row, minlength=7) for row in idx])
    for chunk in (101, 10, 33, None):
        assert np.array_equal(np.concatenate(list(bootstrap_counts(7, 101, seed=3, chunk=chunk))), expected)


def test_offset_stats_point_values_and_seeding():
    """Point values are residual_offset's on the token-weighted means; intervals are seeded."""
    g = torch.Generator().manual_seed(0)
    n, L, d = 30, 4, 8
    tokens = torch.randint(0, 5, (n,), generator=g).float()
    xb = {l: torch.randn(n, d, generator=g) + 3 for l in range(L)}
    xa = {l: xb[l] + 0.1 * (l + 1) * (1 + torch.randn(n, d, generator=g)) for l in range(L)}

    def stats(x):
        return Stats(torch.zeros(L, 1), torch.zeros(L, 1), torch.stack([(x[l] * tokens[:, None]).sum(0) for l in range(L)]),
                     int(tokens.sum()), prompt_tokens=tokens, per_prompt_x=x)

    sb, sa = stats(xb), stats(xa)
    w_hat = torch.randn(d, generator=g)
    w_hat /= w_hat.norm()
    offset = residual_offset(sb.mean_x, sa.mean_x, w_hat)
    r = offset_stats(sb, sa, w_hat, offset, n_boot=300, seed=1)
    rel = np.array([o["relative_norm"] for o in offset])
    assert r["slope"]["mean"] == pytest.approx(np.polyfit(np.arange(L), rel, 1)[0])
    assert r["final_cosine_with_probe"]["mean"] == offset[-1]["cosine_with_probe"]
    assert r["slope"]["n"] == int((tokens > 0).sum())
    assert r["slope"]["ci95"][0] < r["slope"]["mean"] < r["slope"]["ci95"][1]
    assert r == offset_stats(sb, sa, w_hat, offset, n_boot=300, seed=1)
    assert r["slope"]["ci95"] != offset_stats(sb, sa, w_hat, offset, n_boot=300, seed=2)["slope"]["ci95"]


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

    d = a["activation_drop"]
    assert d["verdict_uses"] == "signed"
    for kind in ("raw", "signed"):
        assert set(d[kind]) == {"base", "aligned", "diff", "ci95", "n"}
        assert d[kind]["ci95"][0] <= d[kind]["diff"] <= d[kind]["ci95"][1]
    pp, n_tok = d["per_prompt"], np.array(d["per_prompt"]["n_tokens"])
    assert len(pp["raw_base"]) == len(pp["signed_aligned"]) == 5 and d["raw"]["n"] == int((n_tok > 0).sum())
    kept = n_tok > 0
    raw_base = np.array([x for x in pp["raw_base"] if x is not None])
    # per-prompt means, weighted by their tokens, average to the token-level mean over the top neurons
    assert np.average(raw_base, weights=n_tok[kept]) == pytest.approx(d["mean_base"], rel=1e-4, abs=1e-7)
    assert np.mean(raw_base) == pytest.approx(d["raw"]["base"])
    cos = np.array([r["cosine"] for r in d["per_neuron"]])
    signed = np.average(np.array([x for x in pp["signed_aligned"] if x is not None]), weights=n_tok[kept])
    # the verdict's statistic: (m/s)·cos(v) as it reaches the residual (the tiny Gemma has post-MLP norms, so m/s ≠ m)
    residual = np.array([r["residual_aligned_same_tokens"] for r in d["per_neuron"]])
    assert signed == pytest.approx(np.mean(cos * residual), rel=1e-4, abs=1e-7)
    assert not np.allclose(residual, [r["aligned_same_tokens"] for r in d["per_neuron"]])
    o = a["offset_stats"]
    for k in ("slope", "final_cosine_with_probe"):
        assert set(o[k]) == {"mean", "ci95", "n"} and o[k]["n"] == d["raw"]["n"]
    assert o["final_cosine_with_probe"]["mean"] == a["offset"][-1]["cosine_with_probe"]
    v = a["value_shift_stats"]
    assert v["offset_layer"] == 2
    assert v["share_anti_aligned"]["n"] == 2 * 64  # every neuron of layers 0-1 moved
    assert 0 <= v["share_anti_aligned"]["ci95"][0] <= v["share_anti_aligned"]["mean"] <= v["share_anti_aligned"]["ci95"][1] <= 1
    assert v["contribution_along_offset"]["unit"] == "neurons"
    assert v["contribution_along_offset"]["n"] == round(v["share_anti_aligned"]["mean"] * 128)

    # the token writers are measured in the same passes (their own columns): given the top toxic vectors as the
    # "writers", their drop and its placebo block equal the toxic vectors', and the toxic vectors' are unchanged
    assert len(d["writers"]["neurons"]) == 4 and d["writers"]["control_activation"]["draws"] == 5
    assert d["writers"]["verdict_uses"] == "activation"
    tv = json.loads((t / "vec" / "toxic_vectors.json").read_text())[:4]
    assert [(r["layer"], r["neuron"]) for r in d["writers"]["neurons"]] != [(r["layer"], r["neuron"]) for r in tv]
    write_json(t / "vec" / "token_writers.json", {"rows": [{**r, "score": 1.0} for r in tv]})
    run_analyze(AnalyzeConfig(base=str(tiny_dirs["gemma3"]), aligned=str(t / "aligned"),
                              probe=str(t / "probe.safetensors"), vectors=str(t / "vec"), out=str(t / "an2"),
                              prompts=str(t / "p.jsonl"), lens_search=[str(t / "w.raw")],
                              lens_token="Holy", top_neurons=4, max_new_tokens=4, figure_layers=2))
    d2 = json.loads((t / "an2" / "analysis.json").read_text())["activation_drop"]
    # (equal up to fp32 summation order: the per-layer gathers hold other columns)
    close = lambda x, y: np.testing.assert_allclose(_flat(x), _flat(y), rtol=1e-5, atol=1e-8)  # noqa: E731
    close(d2["signed"], d["signed"]), close(d2["raw"], d["raw"]), close(d2["control"], d["control"])
    close(d2["writers"]["signed"], d["signed"]), close(d2["writers"]["control_signed"], d["control"])
    assert not np.allclose(_flat(d["writers"]["signed"]), _flat(d["signed"]))


def _flat(x) -> list[float]:
    """The numbers of a nested dict/list, in key order (None and strings left out)."""
    if isinstance(x, dict):
        return [v for k in sorted(x) for v in _flat(x[k])]
    if isinstance(x, (list, tuple)):
        return [v for e in x for v in _flat(e)]
    return [float(x)] if isinstance(x, (int, float)) and not isinstance(x, bool) else []


def test_bad_inputs(tiny_dirs, tmp_path):
    lm = load_model(tiny_dirs["gemma3"])
    with pytest.raises(DpolensError, match="not a single token: it splits into"):
        single_token(lm, " antidisestablishmentarianism")
    from dpolens.compare import check_pair

    with pytest.raises(DpolensError, match="differ in architecture"):
        check_pair(lm, load_model(tiny_dirs["gpt2"]))

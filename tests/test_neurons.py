import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import save_perturbed

from dpolens import load_model
from dpolens.artifacts import DpolensError
from dpolens.directions import load_probe, neuron_signs, save_probe
from dpolens.evaluate import EvalData, EvalSettings
from dpolens.attribution import GATED_GROUPS, MIRRORS, crossfit_shares
from dpolens.stages.neurons import (
    GROUPS,
    NeuronsConfig,
    assign_groups,
    fit_split,
    group_intervals,
    group_shares,
    neuron_table,
    run_neurons,
)


def naive_table(base, aligned, probe, prompts, n_new, space="raw"):
    """Slow reference: recompute the whole sequence for each generated token, per-token lists. The projection is
    on w (raw) or on the direction the probe reads after the final norm, γ ⊙ w (standardized)."""
    w = probe * (base.adapter.final_norm_gain() if space == "standardized" else 1.0)
    w = w / w.norm()
    res = {}
    for name, lm in (("base", base), ("aligned", aligned)):
        a = lm.adapter
        ms, mss = [[] for _ in range(a.n_layers)], [[] for _ in range(a.n_layers)]
        prompt_of_token = []  # which prompt each generated token belongs to
        for j, p in enumerate(prompts):
            ids = lm.tokenizer(p)["input_ids"][:32]
            for _ in range(n_new):
                with torch.inference_mode():
                    from dpolens.model import hooks

                    pts = [(l, q) for l in range(a.n_layers) for q in ("mlp_act", "mlp_raw")]
                    with hooks.capture(a, pts) as store:
                        logits = lm.model(input_ids=torch.tensor([ids])).logits
                nxt = int(logits[0, -1].argmax())
                if nxt == lm.tokenizer.eos_token_id:
                    break
                ids = ids + [nxt]
                with torch.inference_mode(), hooks.capture(a, pts) as store:
                    lm.model(input_ids=torch.tensor([ids]))
                prompt_of_token.append(j)
                for l in range(a.n_layers):
                    m = store[(l, "mlp_act")][0][0, -1]
                    s = a.contribution_scale(l, store[(l, "mlp_raw")][0][0, -1])
                    ms[l].append(m)
                    mss[l].append(m / s)
        mean = torch.stack([torch.stack(x).mean(0) for x in ms])
        mean_s = torch.stack([torch.stack(x).mean(0) for x in mss])
        vw = torch.stack([a.value_vectors(l) for l in range(a.n_layers)]) @ w
        res[f"m_{name}"], res[f"p_{name}"] = mean.flatten().numpy(), (mean_s * vw).flatten().numpy()
        owner = torch.tensor(prompt_of_token)
        per_token_p = torch.stack([torch.stack(x) for x in mss], 1) * vw  # [n_tokens, L, d_mlp]
        res[f"prompt_p_{name}"] = torch.stack([per_token_p[owner == j].sum(0).flatten()
                                               for j in range(len(prompts))]).numpy()
        res[f"prompt_tokens_{name}"] = np.bincount(owner.numpy(), minlength=len(prompts))
    return res


@pytest.fixture
def pair(tiny_dirs, tokenizer, tmp_path):
    base = load_model(tiny_dirs["gemma3"])
    save_perturbed("gemma3", tokenizer, tmp_path / "aligned", 2e-2)
    probe = torch.randn(32, generator=torch.Generator().manual_seed(3))
    std = torch.rand(32, generator=torch.Generator().manual_seed(4)) + 0.5
    save_probe(tmp_path / "probe.safetensors", probe, 0.0, base, {}, std,
               neuron_signs(base, ["You are such an idiot", "Holy shit, what a mess"]))
    return base, load_model(tmp_path / "aligned"), probe


@pytest.mark.parametrize("space", ["raw", "standardized"])
def test_streamed_table_matches_naive_reference(pair, space, tmp_path):
    base, aligned, probe = pair
    prompts = ["Holy", "You are such a piece of", "The weather in Paris"]
    t = neuron_table(base, aligned, probe, prompts, batch_size=3, max_new_tokens=4, progress=False,
                     meta=load_probe(tmp_path / "probe.safetensors")[1], space=space)
    ref = naive_table(base, aligned, probe, prompts, 4, space)
    for k in ("m_base", "m_aligned", "p_base", "p_aligned", "prompt_p_base", "prompt_p_aligned"):
        np.testing.assert_allclose(t[k], ref[k], atol=1e-5, rtol=1e-4)
    for k in ("base", "aligned"):
        np.testing.assert_array_equal(t[f"prompt_tokens_{k}"], ref[f"prompt_tokens_{k}"])


def synthetic_table(n_prompts=40, seed=0, noise=0.05):
    """A neuron table with per-prompt projection sums whose token-weighted means are p_base / p_aligned."""
    rng = np.random.default_rng(seed)
    n = 300
    t = {"cosine": rng.normal(size=n), "ms_base": rng.normal(size=n), "layer": np.repeat(np.arange(3), 100),
         "neuron": np.tile(np.arange(100), 3)}
    t["ms_aligned"] = t["ms_base"] + rng.normal(scale=0.1, size=n)
    for name, ms in (("base", t["ms_base"]), ("aligned", t["ms_aligned"])):
        tokens = rng.integers(1, 6, size=n_prompts).astype(float)
        per_token = ms * t["cosine"] * (1 + rng.normal(scale=noise, size=(n_prompts, n)))
        t[f"prompt_p_{name}"] = (per_token * tokens[:, None]).astype(np.float32)  # [n_prompts, n] sums
        t[f"prompt_tokens_{name}"] = tokens
        t[f"p_{name}"] = t[f"prompt_p_{name}"].astype(np.float64).sum(0) / tokens.sum()
    t["delta"] = t["p_base"] - t["p_aligned"]
    return t


def test_group_intervals_are_seeded_and_cover_the_shares():
    t = synthetic_table()
    labels = assign_groups(t)
    s = group_shares(t, labels, top_toxic=30)
    ci = group_intervals(t, labels, 30, n_boot=400, seed=0)
    assert set(ci) == set(GROUPS + MIRRORS) | {"toxic_neurons"}
    assert ci == group_intervals(t, labels, 30, n_boot=400, seed=0)
    assert ci != group_intervals(t, labels, 30, n_boot=400, seed=1)
    for g in GROUPS:
        for k in ("share_of_positive", "share_of_net"):
            lo, hi = ci[g][f"ci95_{k}"]
            assert lo <= s["groups"][g][k] <= hi
    lo, hi = ci["toxic_neurons"]["ci95_share_of_positive"]
    assert lo <= s["toxic_neurons"]["share_of_positive"] <= hi
    # with no noise between prompts' tokens the only spread is the token weighting: intervals shrink
    tight = group_intervals(synthetic_table(noise=0.0), labels, 30, n_boot=400, seed=0)
    width = lambda c: c["TP-"]["ci95_share_of_positive"][1] - c["TP-"]["ci95_share_of_positive"][0]
    assert width(tight) < width(ci)


def test_groups_partition_the_positive_reduction():
    rng = np.random.default_rng(0)
    n = 500
    t = {"cosine": rng.normal(size=n), "ms_base": rng.normal(size=n), "layer": np.repeat(np.arange(5), 100),
         "neuron": np.tile(np.arange(100), 5)}
    t["ms_aligned"] = t["ms_base"] + rng.normal(scale=0.1, size=n)
    vw = t["cosine"] * 2.0
    t["delta"] = (t["ms_base"] - t["ms_aligned"]) * vw
    labels = assign_groups(t)
    s = group_shares(t, labels, top_toxic=50)
    assert sum(s["groups"][g]["share_of_positive"] for g in GROUPS) == pytest.approx(1.0)
    assert all(t["delta"][labels == g].min() > 0 for g in GROUPS)
    assert s["totals"]["net"] == pytest.approx(t["delta"].sum())
    tp = (t["cosine"] > 0) & (t["ms_base"] >= 0) & (t["ms_aligned"] < t["ms_base"])
    assert (labels[tp] == "TP-").all()  # here Δ comes from activations only: names agree fully
    assert all(s["groups"][g]["agreement"] == 1.0 for g in GROUPS)
    # gated: two sign-invariant groups, the unions of TP-/AN- and TN+/AP+, with the same reductions
    gl = assign_groups(t, gated=True)
    gs = group_shares(t, gl, top_toxic=50, gated=True)
    assert set(gs["groups"]) == {"TP-/AN-", "TN+/AP+", "TP+/AN+", "TN-/AP-"} and gs["mlp"] == "gated"
    assert gs["groups"]["TP-/AN-"]["reduction"] == pytest.approx(s["groups"]["TP-"]["reduction"] +
                                                                s["groups"]["AN-"]["reduction"])
    assert sum(gs["groups"][g]["share_of_positive"] for g in GATED_GROUPS) == pytest.approx(1.0)
    assert all(gs["groups"][g]["agreement"] == 1.0 for g in GATED_GROUPS)


@pytest.mark.parametrize("patch", ["set", "shift"])
def test_run_neurons_writes_everything(pair, tiny_dirs, tmp_path, jigsaw_cached, patch):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                                              ["Holy", "You are", "So I am", "The weather", "Holy cow", "Nice"]))
    cfg = NeuronsConfig(base=str(tiny_dirs["gemma3"]), aligned=str(tmp_path / "aligned"),
                        probe=str(tmp_path / "probe.safetensors"), out=str(tmp_path / "n"), fit_prompts=3,
                        top_toxic=16, cluster_sample=200, patch=patch,
                        eval=EvalData(prompts=str(tmp_path / "p.jsonl"), f1_data=None, wikitext=None,
                                      progress=False, settings=EvalSettings(max_new_tokens=4)))
    r = run_neurons(cfg)
    df = pd.read_parquet(tmp_path / "n" / "neurons.parquet")
    assert list(df.columns[:10]) == ["layer", "neuron", "cosine", "m_base", "m_aligned", "ms_base", "ms_aligned",
                                     "p_base", "p_aligned", "delta"]
    assert len(df) == 3 * 64
    g = json.loads((tmp_path / "n" / "groups.json").read_text())
    assert g["four_groups_share_of_positive"] == pytest.approx(1.0)
    assert set(g["toxic_neurons"]) >= {"share_of_positive", "share_of_net", "ci95_share_of_positive",
                                       "ci95_share_of_net"}
    assert g["mlp"] == "gated" and set(g["groups"]) == {"TP-/AN-", "TN+/AP+", "TP+/AN+", "TN-/AP-"}
    for name in GATED_GROUPS:  # Gemma's MLP is gated: two sign-invariant groups
        x = g["groups"][name]
        if x["share_of_positive"] is not None:
            assert len(x["ci95_share_of_positive"]) == 2 and len(x["ci95_share_of_net"]) == 2
    assert g["bootstrap"]["n"] == 3 and g["bootstrap"]["unit"] == "fit prompts"
    p = json.loads((tmp_path / "n" / "patching.json").read_text())
    assert [s["groups"][-1] for s in p["steps"]] == ["TP-/AN-", "TN+/AP+"]
    assert p["n_eval_prompts"] == 3  # disjoint from the 3 fit prompts
    assert p["mode"] == patch
    # the nulls: random neuron sets of the toxic set's size, and a random patch of the groups' size and shift norm
    assert g["crossfit"] == {"note": "3 prompts: too few to split"}  # random sets: test_crossfit_random_sets
    rnd = p["random"]
    assert rnd["n_neurons"] == p["steps"][-1]["n_neurons"] and len(rnd["toxicity_per_prompt"]) == 3
    assert rnd["scale"] > 0 and rnd["shift_norm"] > 0
    assert (tmp_path / "n" / "editing.json").exists() and all((tmp_path / "n" / f).exists() for f in r["figures"])


def test_patch_steps_endpoint_is_the_cumulative_last_step(pair, tiny_dirs, tmp_path, jigsaw_cached):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                                              ["Holy", "You are", "So I am", "The weather", "Holy cow", "Nice"]))
    steps = {}
    for mode in ("cumulative", "endpoint"):
        cfg = NeuronsConfig(base=str(tiny_dirs["gemma3"]), aligned=str(tmp_path / "aligned"),
                            probe=str(tmp_path / "probe.safetensors"), out=str(tmp_path / mode), fit_prompts=3,
                            top_toxic=16, cluster_sample=200, patch="shift", patch_steps=mode,
                            eval=EvalData(prompts=str(tmp_path / "p.jsonl"), f1_data=None, wikitext=None,
                                          progress=False, settings=EvalSettings(max_new_tokens=4)))
        steps[mode] = run_neurons(cfg)["patching"]["steps"]
    assert len(steps["cumulative"]) == 2 and len(steps["endpoint"]) == 1
    last, end = steps["cumulative"][-1], steps["endpoint"][0]
    assert end["groups"] == ["TP-/AN-", "TN+/AP+"] and end["n_neurons"] == last["n_neurons"]
    assert end["toxicity"] == last["toxicity"] and end["toxicity_per_prompt"] == last["toxicity_per_prompt"]


def test_fit_from_pairs_keeps_every_evaluation_prompt(pair, tiny_dirs, tmp_path, jigsaw_cached):
    """Fitting on the pairs' prompts leaves all evaluation prompts to patching; an evaluation prompt
    that is also a pair's prompt is not fitted on."""
    prompts = ["Holy", "You are", "So I am", "The weather", "Holy cow", "Nice"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    pair_prompts = ["You are", "Shut up", "Shut up", "What a", "Go away", "Later"]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(
        {"prompt_text": p, "unpert_gen_text": " fine", "pert_gen_text": " damn"}) + "\n" for p in pair_prompts))
    cfg = NeuronsConfig(base=str(tiny_dirs["gemma3"]), aligned=str(tmp_path / "aligned"),
                        probe=str(tmp_path / "probe.safetensors"), out=str(tmp_path / "n"), fit_prompts=3,
                        fit_from="pairs", pairs=str(tmp_path / "pairs.jsonl"), top_toxic=16, cluster_sample=200,
                        patch="shift", patch_steps="endpoint", edit=False,
                        eval=EvalData(prompts=str(tmp_path / "p.jsonl"), f1_data=None, wikitext=None,
                                      progress=False, settings=EvalSettings(max_new_tokens=4)))
    assert fit_split(cfg) == (["Shut up", "What a", "Go away"], 0)
    r = run_neurons(cfg)
    assert r["patching"]["n_eval_prompts"] == 6 and r["patching"]["eval_offset"] == 0
    assert len(r["patching"]["steps"][0]["toxicity_per_prompt"]) == 6
    assert r["groups"]["fit"]["from"] == "pairs" and r["groups"]["bootstrap"]["n"] == 3
    assert r["editing"] is None and not (tmp_path / "n" / "editing.json").exists()
    with pytest.raises(DpolensError, match="distinct prompts outside"):
        fit_split(dataclasses.replace(cfg, fit_prompts=5))


def noisy_table(effect: float, n_prompts: int = 100, seed: int = 0) -> dict:
    """A neuron table whose aligned model moves 40% of the neurons' activations by `effect` against the
    probe (0: two identical models), seen through per-prompt noise (each prompt's activations vary)."""
    rng = np.random.default_rng(seed)
    n = 400
    cos, ms_b = rng.normal(size=n), rng.normal(size=n)
    ms_a = ms_b - effect * np.sign(cos) * (rng.random(n) < 0.4)
    t = {"cosine": cos, "vw_base": cos, "vw_aligned": cos, "layer": np.repeat(np.arange(4), 100),
         "neuron": np.tile(np.arange(100), 4)}
    for name, ms in (("base", ms_b), ("aligned", ms_a)):
        tokens = rng.integers(5, 15, size=n_prompts).astype(float)
        per_token = ms * cos * (1 + rng.normal(scale=0.5, size=(n_prompts, n)))
        t[f"prompt_p_{name}"], t[f"prompt_tokens_{name}"] = per_token * tokens[:, None], tokens
        t[f"p_{name}"] = t[f"prompt_p_{name}"].sum(0) / tokens.sum()
        t[f"ms_{name}"] = t[f"p_{name}"] / cos
    t["delta"] = t["p_base"] - t["p_aligned"]
    return t


def spreads_verdict(tmp_path, t) -> dict:
    """The `reduction_spreads` row of a groups.json written from table `t` as the stage writes it."""
    from dpolens.attribution import crossfit_shares
    from dpolens.ledger import StageContext, decide
    from dpolens.stages import neurons

    labels = assign_groups(t)
    shares = group_shares(t, labels, top_toxic=40)
    for name, ci in group_intervals(t, labels, 40, n_boot=400, seed=0).items():
        target = shares["toxic_neurons"] if name == "toxic_neurons" else shares["groups"][name]
        target.update(ci)
    shares["crossfit"] = crossfit_shares(t, 40, n_boot=400, seed=0)
    (tmp_path / "neurons").mkdir(exist_ok=True)
    (tmp_path / "neurons" / "groups.json").write_text(json.dumps(shares))
    claim = next(c for c in neurons.CLAIMS if c.id == "reduction_spreads")
    assert claim.mechanism  # decided here on the statistic alone (the placebo rule: test_mechanism_rows_do_not_hold...)
    return shares, decide(dataclasses.replace(claim, mechanism=False), StageContext(tmp_path / "neurons", n_boot=400))


def test_cross_fitted_groups_fail_on_two_identical_models_and_hold_on_a_real_shift(tmp_path):
    """Chosen and measured on the same prompts, every group's share is positive for two identical models
    (the in-sample intervals all exclude zero); cross-fitted, the smallest share's interval does not."""
    shares, row = spreads_verdict(tmp_path, noisy_table(effect=0.0))
    assert all(shares["groups"][g]["ci95_share_of_positive"][0] > 0 for g in GROUPS)  # the in-sample trap
    assert row["verdict"] != "holds", row
    cf = shares["crossfit"]
    assert cf["split"] == {"choose": 50, "measure": 50, "seed": 0, "n_boot": 400}
    assert cf["four_groups_reduction"]["ci95"][0] <= 0 or cf["min"]["ci95"][0] <= 0
    shares, row = spreads_verdict(tmp_path, noisy_table(effect=0.3))
    assert row["verdict"] == "holds", row
    cf = shares["crossfit"]
    assert all(cf["groups"][g]["share"] > 0 for g in GROUPS) and cf["min"]["ci95"][0] > 0
    assert cf["min"]["share"] == pytest.approx(min(cf["groups"][g]["share"] for g in GROUPS))
    assert cf["min"]["ci95"][1] <= max(cf["groups"][g]["ci95"][1] for g in GROUPS)
    assert row["ci95"] == cf["min"]["ci95"] and "cross-fitted" in row["ours"]


def test_reduction_spreads_against_placebos_holds_for_a_real_shift_and_not_for_noise(tmp_path, monkeypatch):
    """Issue #31, the positive control of the placebo comparison (the stage's own path: `placebo_shares`, then the
    ledger): placebos are the base seen through fresh per-prompt noise. A model that moves 40% of the neurons
    against the probe reads holds against them; a model that is itself such a draw does not."""
    from dpolens.ledger import StageContext, decide
    from dpolens.stages import neurons

    def redrawn(t: dict, seed: int) -> dict:  # the aligned side again: base activations, new per-prompt noise
        rng = np.random.default_rng(100 + seed)
        ms = t["p_base"] / t["cosine"]
        tokens = rng.integers(5, 15, size=len(t["prompt_tokens_base"])).astype(float)
        per_token = ms * t["cosine"] * (1 + rng.normal(scale=0.5, size=t["prompt_p_base"].shape))
        return {**t, "prompt_p_aligned": per_token * tokens[:, None], "prompt_tokens_aligned": tokens}

    class Draw:
        def __init__(self, k):
            self.k = k

        def identity(self):
            return {"weight_sha256": f"draw {self.k}"}

    monkeypatch.setattr(neurons, "placebo", lambda base, aligned, seed: Draw(seed))
    cfg = neurons.NeuronsConfig(top_toxic=40, n_boot=400, control_draws=3)
    verdicts, small_verdicts = {}, {}
    for effect in (0.3, 0.0):
        t = noisy_table(effect)
        if effect == 0.0:
            t = redrawn(t, 99)  # a placebo-like model: no shift, only a draw of the noise
        draws = iter(range(3))  # the same 3 placebo draws for both models
        monkeypatch.setattr(neurons, "neuron_table", lambda *a, base_from, **k: redrawn(base_from, next(draws)))
        labels = assign_groups(t)
        shares = group_shares(t, labels, top_toxic=40)
        for name, ci in group_intervals(t, labels, 40, n_boot=400, seed=0).items():
            (shares["toxic_neurons"] if name == "toxic_neurons" else shares["groups"][name]).update(ci)
        shares["crossfit"] = crossfit_shares(t, 40, n_boot=400, seed=0, replicates=True)
        shares["crossfit"]["control"], _ = neurons.placebo_shares(cfg, None, None, None, {}, [], t, shares["crossfit"],
                                                                  False)
        shares["crossfit"].pop("_replicates")
        (tmp_path / "neurons").mkdir(exist_ok=True)
        (tmp_path / "neurons" / "groups.json").write_text(json.dumps(shares))
        claim = next(c for c in neurons.CLAIMS if c.id == "reduction_spreads")
        row = decide(claim, StageContext(tmp_path / "neurons", n_boot=400))
        verdicts[effect] = (row["verdict"], (row["placebo"] or {}).get("difference_verdict"))
        small = decide(next(c for c in neurons.CLAIMS if c.id == "toxic_neurons_small_share"),
                       StageContext(tmp_path / "neurons", n_boot=400))
        small_verdicts[effect] = (small["verdict"], (small["placebo"] or {}).get("difference_verdict"))
        if effect:
            # the toxic share's placebo column is a reduction (toxic neurons' minus half the groups'), not a share:
            # the placebos' shares here are ratios of noise (measured: 3.36 [0.02, 6.64])
            assert "not the share" in small["ours"]
            ctl = shares["crossfit"]["control"]["toxic_minus_half"]
            assert small["placebo"]["diff"] == pytest.approx(ctl["diff"]) and ctl["diff_ci95"][1] < 0, small
            # reduction_spreads' placebo column is the smallest group's reduction, aligned − mean placebo
            ctl = shares["crossfit"]["control"]["min_reduction"]
            assert row["placebo"]["diff"] == pytest.approx(ctl["diff"]) and ctl["diff_ci95"][0] > 0, row
    # measured (2026-12-06): shift: smallest share 16.4% [13.2%, 20.0%], placebo reduction −1.21, aligned − placebo
    # 7.85 [3.51, 12.20]; noise: its groups do not reduce the projection on the measuring half (inconclusive)
    assert verdicts[0.3] == ("holds", "holds") and verdicts[0.0][0] != "holds" and verdicts[0.0][1] != "holds"
    # measured: shift: toxic share − 0.5 = −0.42 [−0.46, −0.39]; toxic − half the four groups' reduction, aligned −
    # placebo −18.5 [−23.1, −13.9] (placebo 1.45 [−0.49, 3.19]); noise: the four groups reduce nothing on the
    # measuring half, so no cross-fitted share and no placebo column
    assert small_verdicts[0.3] == ("holds", "holds") and small_verdicts[0.0][0] != "holds"


def test_crossfit_random_sets_are_the_toxic_neurons_null():
    t = synthetic_table()
    t["vw_base"] = t["vw_aligned"] = t["cosine"]  # p = m · (v·ŵ) with v·ŵ = the cosine here
    cf = crossfit_shares(t, 30, n_boot=200, seed=0)
    rs = cf["toxic_neurons"]["random_sets"]
    assert rs["n_sets"] == 20 and rs["count"] == cf["toxic_neurons"]["count"] > 0
    d = rs["toxic_minus_random"]
    assert d["diff"] == pytest.approx(cf["toxic_neurons"]["share"] - rs["share"])
    assert d["ci95"][0] <= d["diff"] <= d["ci95"][1]
    assert crossfit_shares(t, 30, n_boot=200, seed=0, n_random=0)["toxic_neurons"]["random_sets"] is None


def test_mechanism_rows_do_not_hold_when_the_aligned_model_is_a_placebo(pair, tiny_dirs, tmp_path, jigsaw_cached):
    """Issue #31: the "aligned" model here is the base plus noise, i.e. a placebo. The neurons stage measures its
    mechanism rows for placebos too (same halves, same replicates); neither row may read holds."""
    from dpolens.ledger import StageContext, decide
    from dpolens.stages import neurons

    prompts = ["Holy", "You are", "So I am", "The weather", "Holy cow", "Nice", "What a", "Go away", "Shut up",
               "Later on", "I think", "They said"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    cfg = NeuronsConfig(base=str(tiny_dirs["gemma3"]), aligned=str(tmp_path / "aligned"),
                        probe=str(tmp_path / "probe.safetensors"), out=str(tmp_path / "n"), fit_prompts=8,
                        top_toxic=16, cluster_sample=200, patch="shift", patch_steps="endpoint", edit=False,
                        patch_random=False, control_draws=3, n_boot=300,
                        eval=EvalData(prompts=str(tmp_path / "p.jsonl"), f1_data=None, wikitext=None,
                                      progress=False, settings=EvalSettings(max_new_tokens=4)))
    run_neurons(cfg)
    g = json.loads((tmp_path / "n" / "groups.json").read_text())
    ctl = g["crossfit"]["control"]
    assert ctl["draws"] == 3 and len(ctl["models"]) == 3 and len({m["weight_sha256"] for m in ctl["models"]}) == 3
    assert "_replicates" not in g["crossfit"]
    for stat in ("toxic_neurons", "min", "min_reduction", "toxic_minus_half"):
        assert len(ctl[stat]["draws"]) == 3
        # aligned − mean placebo (measured here for every statistic: every draw's share is defined)
        point = {"toxic_neurons": g["crossfit"]["toxic_neurons"]["share"], "min": g["crossfit"]["min"]["share"],
                 "min_reduction": g["crossfit"]["min"]["reduction"],
                 "toxic_minus_half": g["crossfit"]["toxic_neurons"]["minus_half_four_groups"]}[stat]
        assert ctl[stat]["diff"] == pytest.approx(point - np.mean(ctl[stat]["draws"]))
        assert ctl[stat]["ci95"][0] <= ctl[stat]["ci95"][1] and ctl[stat]["mean"] == pytest.approx(
            np.mean(ctl[stat]["draws"]))
    ctx = StageContext(tmp_path / "n", n_boot=300)
    alone = []
    for claim in neurons.CLAIMS:
        if claim.mechanism:
            row = decide(claim, ctx)
            if claim.id == "reduction_spreads":  # its placebo column is the smallest group's reduction, not a share
                assert row["placebo"]["diff"] == pytest.approx(ctl["min_reduction"]["diff"])
                assert "not its share" in row["diagnosis"]
            if claim.id == "toxic_neurons_small_share":  # the toxic neurons' reduction minus half the groups'
                assert row["placebo"]["diff"] == pytest.approx(ctl["toxic_minus_half"]["diff"])
                assert "not the share" in row["diagnosis"]
            assert row["verdict"] != "holds", row
            assert row["placebo"] and row["placebo"]["difference_verdict"] != "holds", row
            alone.append(decide(dataclasses.replace(claim, mechanism=False), ctx)["verdict"])
    # measured (2026-12-06): on its own statistic each row holds for this placebo-like model (toxic share − 0.5
    # −0.51 [−0.79, −0.43]; smallest group 0.33 [0.22, 0.39]): the placebo comparison is what keeps them from holding
    assert alone == ["holds", "holds"]
    # the toxic neurons ranked as token writers: the same cross-fit (same halves and groups) and placebo draws
    cw = g["crossfit_writers"]
    assert cw["min"] == g["crossfit"]["min"] and cw["split"] == g["crossfit"]["split"] and "_replicates" not in cw
    assert cw["control"]["draws"] == 3 and cw["control"]["models"] == ctl["models"]
    row = decide(next(c for c in neurons.CLAIMS if c.id == "toxic_neurons_small_share"), ctx)
    assert not row["alternatives"] and "ranked as token writers" in row["ours"]


def test_toxic_minus_half_is_the_share_below_one_half_times_the_reduction():
    """The toxic share's placebo statistic, T − F/2 = (share − 0.5)·F (no ratio): negative where the toxic neurons
    carry under half of a positive reduction, positive where they carry more (it can come out the other way)."""
    def table(dampen_toxic_only: bool, seed=0, n_prompts=40):
        rng = np.random.default_rng(seed)
        n = 300
        t = {"cosine": rng.normal(size=n), "ms_base": np.abs(rng.normal(size=n)) + 0.1}
        top = np.argsort(-t["cosine"])[:30]
        t["ms_aligned"] = t["ms_base"] * (1 - 0.3 * rng.random(n))  # every neuron dampened a little
        if dampen_toxic_only:
            t["ms_aligned"] = t["ms_base"].copy()
            t["ms_aligned"][top] *= 0.5  # only the most toxic neurons, hard
        for name in ("base", "aligned"):
            tokens = rng.integers(1, 6, size=n_prompts).astype(float)
            per_token = t[f"ms_{name}"] * t["cosine"] * (1 + rng.normal(scale=0.02, size=(n_prompts, n)))
            t[f"prompt_p_{name}"] = (per_token * tokens[:, None]).astype(np.float32)
            t[f"prompt_tokens_{name}"] = tokens
        t["vw_base"] = t["vw_aligned"] = t["cosine"]
        return t

    for toxic_only in (False, True):
        cf = crossfit_shares(table(toxic_only), 30, n_boot=200, seed=0, n_random=0)
        tn, four = cf["toxic_neurons"], cf["four_groups_reduction"]["value"]
        assert tn["minus_half_four_groups"] == pytest.approx((tn["share"] - 0.5) * four, rel=1e-6)
        lo, hi = tn["minus_half_four_groups_ci95"]
        assert four > 0 and (hi < 0 if not toxic_only else lo > 0), (toxic_only, tn, four)

"""The claims ledger: the verdict rule, the paired statistics behind it, and claims.json built from a
hand-written run directory (no model, no network)."""

import json
import math

import numpy as np
import pytest
import torch

from dpolens.artifacts import DpolensError, write_json
from dpolens.claims import build_claims, registered_claims, render_text, write_claims
from dpolens.ledger import VERDICTS, verdict

CLAIMS = [c for _, c in registered_claims()]
from dpolens.evaluate import (EvalResult, bootstrap_ratio, paired_bootstrap, paired_gap_share, paired_ppl_ratio,
                              perplexity, ppl_windows, resample_units)
from dpolens.scoring import Scores

N_PROMPTS = 120


# ---- the rule --------------------------------------------------------------------------------------

def test_verdict_rule_each_outcome():
    assert verdict([0.01, 0.2], +1) == "holds"
    assert verdict([-0.3, -0.02], -1) == "holds"
    assert verdict([-0.3, -0.02], +1) == "contradicted"
    assert verdict([0.05, 0.3], -1) == "contradicted"
    assert verdict([-0.1, 0.2], +1) == "inconclusive"
    assert verdict([0.0, 0.2], +1) == "inconclusive"  # touching zero does not exclude it
    assert verdict(None, +1) == "inconclusive"  # no interval: never holds
    assert verdict([float("nan"), 0.3], +1) == "inconclusive"
    assert verdict([0.2, 0.2], +1) == "holds"  # a deterministic check: the point is its interval


def test_interval_crossing_zero_never_holds():
    rng = np.random.default_rng(0)
    for lo, hi in zip(-rng.exponential(size=200), rng.exponential(size=200)):
        assert verdict([lo, hi], +1) == verdict([lo, hi], -1) == "inconclusive"


# ---- paired statistics -----------------------------------------------------------------------------

def test_paired_bootstrap_matches_a_slow_reference():
    rng = np.random.default_rng(1)
    a = rng.uniform(size=37)
    b = a - 0.05 + 0.1 * rng.normal(size=37)
    got = paired_bootstrap(a, b, n_boot=500, seed=7)
    ref_rng = np.random.default_rng(7)
    diffs = []
    for _ in range(500):  # one resample of the prompts at a time, the same pairs kept together
        idx = ref_rng.integers(0, len(a), size=len(a))
        diffs.append(sum(b[i] - a[i] for i in idx) / len(a))
    assert got["ci95"] == pytest.approx(list(np.quantile(diffs, [0.025, 0.975])), rel=1e-12)
    assert got["diff"] == pytest.approx(b.mean() - a.mean()) and got["n"] == 37
    assert got["mean_a"] == pytest.approx(a.mean()) and got["mean_b"] == pytest.approx(b.mean())
    assert got["ci95"][1] < 0  # the shared per-prompt variation cancels: a 0.05 shift is resolved
    assert paired_bootstrap(a, b, n_boot=500, seed=7) == got  # seeded
    with pytest.raises(DpolensError, match="same units"):
        paired_bootstrap(a, b[:-1])


def test_ppl_ratio_and_weighted_ratio():
    nll_a, tok = np.array([30.0, 28.0, 35.0, 31.0]), np.array([10, 10, 12, 10])
    r = paired_ppl_ratio(nll_a, tok, nll_a * 1.1, tok, n_boot=200)
    assert r["ppl_a"] == pytest.approx(math.exp(nll_a.sum() / tok.sum()))
    assert r["ratio"] == pytest.approx(math.exp(0.1 * nll_a.sum() / tok.sum()))
    assert r["ci95"][0] <= r["ratio"] <= r["ci95"][1] and r["n"] == 4
    # a 1023-token window and a 1-token remainder (the algorithms study's PPL text): no interval
    two = paired_ppl_ratio([2388.48, 22.48], [1023, 1], [2394.39, 20.46], [1023, 1], n_boot=200)
    assert two["ci95"] is None and two["ratio"] == pytest.approx(math.exp((2394.39 + 20.46 - 2388.48 - 22.48) / 1024))
    w = bootstrap_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 3.0], n_boot=100)
    assert w["mean"] == pytest.approx(2.0) and w["ci95"] == pytest.approx([2.0, 2.0])


def test_paired_gap_share_matches_a_naive_bootstrap():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, 40)
    aligned = base - 0.15 + rng.normal(0, 0.02, 40)
    other = aligned + 0.6 * (base - aligned) + rng.normal(0, 0.01, 40)  # 60% of the gap back
    r = paired_gap_share(base, aligned, other, n_boot=300, seed=3)
    assert r["share"] == pytest.approx((other.mean() - aligned.mean()) / (base.mean() - aligned.mean()))
    naive = [(other[i].mean() - aligned[i].mean()) / (base[i].mean() - aligned[i].mean())
             for i in resample_units(40, 300, 3)]
    assert r["ci95"] == pytest.approx(list(np.quantile(naive, [0.025, 0.975])))
    assert r["ci95"][0] < 0.6 < r["ci95"][1] and r["gap"]["ci95"][1] < 0
    no_gap = paired_gap_share(base, base + rng.normal(0, 0.01, 40), other, n_boot=300)
    assert no_gap["ci95"] is None and no_gap["gap"]["ci95"][0] < 0 < no_gap["gap"]["ci95"][1]


def test_perplexity_windows_sum_to_the_total(tiny_lm):
    paras = ["The quick brown fox jumps over the lazy dog.", "Holy cow, this is a great book."] * 5
    got = perplexity(tiny_lm, paras, window=16, batch_size=3, progress=False)
    assert sum(got["window_tokens"]) == got["scored_tokens"] and len(got["window_nll"]) > 2
    assert math.exp(sum(got["window_nll"]) / sum(got["window_tokens"])) == pytest.approx(got["perplexity"], rel=1e-9)
    windows, _ = ppl_windows(tiny_lm, paras, window=16)
    x = torch.tensor([windows[-1]])  # text order: the last window is the short tail
    with torch.inference_mode():
        logits = tiny_lm.model(input_ids=x).logits[0, :-1].float()
    ref = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
    assert got["window_nll"][-1] == pytest.approx(ref, rel=1e-4) and got["window_tokens"][-1] == len(windows[-1]) - 1


def test_eval_row_carries_per_unit_scores():
    res = EvalResult({"mean": 0.25, "ci95": [0.1, 0.4], "n": 2, "scorer": {}},
                     {"perplexity": 9.0, "window_nll": [4.0, 5.0], "window_tokens": [2, 3]},
                     {"mean": 0.5, "ci95": [0, 1], "n": 2}, 0.0,
                     [{"toxicity": 0.1}, {"toxicity": 0.4}], [0.0, 1.0])
    row = res.row()
    assert row["toxicity"] == {"mean": 0.25, "ci95": [0.1, 0.4], "n": 2} and row["perplexity"] == 9.0
    assert row["toxicity_per_prompt"] == [0.1, 0.4] and row["f1_per_row"] == [0.0, 1.0]
    assert row["ppl_window_nll"] == [4.0, 5.0] and row["ppl_window_tokens"] == [2, 3]


# ---- a hand-written run directory ------------------------------------------------------------------

class WordScorer:
    """Toxicity 1 for a few insults, else 0."""

    def score(self, texts):
        return Scores(np.array([float(t.lower() in {"idiot", "stupid", "moron"}) for t in texts]))

    def describe(self):
        return {"name": "words", "version": "test"}


MODEL = {"ref": "tiny-base", "weight_sha256": "aa" * 32, "dtype": "float32", "family": "gemma"}
ALIGNED = {"ref": "runs/x/dpo/model", "weight_sha256": "bb" * 32, "dtype": "float32", "family": "gemma"}


def eval_row(model, tox, rng, ppl_scale=1.0, ident=MODEL, windows=24):
    nll = list(30.0 * ppl_scale + 0.05 * rng.normal(size=windows))
    return {"model": model, "ref": ident["ref"], "weight_sha256": ident["weight_sha256"],
            "toxicity": {"mean": float(np.mean(tox)), "ci95": [0, 1], "n": len(tox)},
            "perplexity": math.exp(sum(nll) / (10 * windows)), "f1": 0.2, "repetition": 0.0,
            "toxicity_per_prompt": [float(x) for x in tox], "f1_per_row": list(0.2 + 0.01 * rng.normal(size=20)),
            "ppl_window_nll": nll, "ppl_window_tokens": [10] * windows}


def make_run(root, rng):
    run = root / "runs" / "synthetic"
    scorer = {"name": "words", "version": "test"}
    base_tox = rng.uniform(0.1, 0.6, size=N_PROMPTS)
    aligned_tox = np.clip(base_tox - 0.1 + 0.02 * rng.normal(size=N_PROMPTS), 0, 1)
    # probe
    y = np.r_[np.zeros(40), np.ones(40)].astype(int)
    prob = np.clip(0.25 + 0.5 * y + 0.15 * rng.normal(size=80), 0, 1)
    write_json(run / "probe" / "metrics.json", {
        "accuracy": float(((prob >= 0.5) == y).mean()), "balanced_accuracy": 0.9, "f1": 0.9, "auroc": 0.95,
        "majority_baseline": 0.5, "n_train": 720, "n_val": 80, "model": MODEL, "data": {"corpus.csv": {}}, "seed": 0})
    write_json(run / "probe" / "val_predictions.json", {"label": y.tolist(), "prob": prob.tolist(), "threshold": 0.5})
    # vectors: the top cosine vectors write insults, random ones do not
    write_json(run / "vectors" / "toxic_vectors.json", [
        {"rank": i, "layer": 2, "neuron": i, "cosine": 0.5 - 0.01 * i, "norm": 1.0,
         "top_tokens": [" idiot", " stupid", "moron", " the"] if i % 2 == 0 else [" idiot", " a", " of", " the"]}
        for i in range(12)])
    write_json(run / "vectors" / "summary.json", {"model": MODEL})
    write_json(run / "vectors" / "random_vectors.json", {"n": 50, "seed": 0, "projection": "norm", "rows": [
        {"layer": 1, "neuron": i, "top_tokens": [" idiot" if i == 3 else " cat", " a", " dog", " the"]}
        for i in range(50)]})
    write_json(run / "vectors" / "token_writers.json", {
        "probe_tokens": [" idiot"], "median_cosine_rank": 900.0,
        "rows": [{"layer": 1, "neuron": 5, "score": 3.0, "cosine": 0.01, "cosine_rank": 900, "top_tokens": []}]})
    # table2: probe beats random, the MLP.v does not
    t2 = [{"method": "no-op", "vector": "none", "alpha": 0.0, "alpha_rel": 0.0, **eval_row("", base_tox, rng)},
          {"method": "subtract", "vector": "probe", "alpha": 5.0, "alpha_rel": 0.1,
           **eval_row("", aligned_tox, rng, 1.02)},
          {"method": "subtract", "vector": "mlp.v L2.0", "alpha": 5.0, "alpha_rel": 0.1,
           **eval_row("", base_tox + 0.01 * rng.normal(size=N_PROMPTS), rng, 1.02)},
          {"method": "subtract", "vector": "svd.u0", "alpha": 5.0, "alpha_rel": 0.1,
           **eval_row("", base_tox - 0.05, rng, 1.02)},
          {"method": "subtract", "vector": "random", "alpha": 5.0, "alpha_rel": 0.1,
           **eval_row("", base_tox, rng, 1.01)},
          *({"method": "subtract", "vector": f"random {k}", "alpha": 5.0, "alpha_rel": 0.1,
             **eval_row("", np.clip(base_tox + 0.01 * rng.normal(size=N_PROMPTS), 0, 1), rng, 1.01)}
            for k in range(2, 6))]
    write_json(run / "table2" / "table.json", {"rows": t2, "model": MODEL, "scorer": scorer,
                                               "point": {"layer": 2, "name": "resid_post"}, "n_prompts": N_PROMPTS})
    # dpo
    write_json(run / "dpo" / "eval.json", {"rows": [eval_row("base", base_tox, rng),
                                                    eval_row("aligned", aligned_tox, rng, 1.02, ALIGNED)],
                                           "scorer": scorer, "n_prompts": N_PROMPTS})
    # drift: one marker over-used (contradicted), a reduction beyond the cue words (holds), no collapse
    write_json(run / "dpo" / "drift.json", {"models": {"aligned": {
        "overuse": {"chosen_on": 100, "measured_on": 100, "split_seed": 0,
                    "words": [{"word": "<year>", "base_share": 0.02, "aligned_share": 0.34}],
                    "worst": {"word": "<year>", "excess": 0.3, "excess_ci95": [0.25, 0.35], "factor": 2.0,
                              "rise_word": "<year>", "rise": 0.12, "rise_ci95": [0.05, 0.2]}},
        "cue_sensitivity": {"threshold": 0.8, "n_cues": 2, "cues": [{"word": "idiot", "toxicity": 0.9}],
                            "reduction": {"mean": 0.1, "ci95": [0.08, 0.12]},
                            "masked_reduction": {"mean": 0.05, "ci95": [0.02, 0.08]},
                            "share_kept": {"mean": 0.5, "ci95": [0.3, 0.7]}, "n": N_PROMPTS}}}})
    write_json(run / "dpo" / "summary.json", {"base": MODEL, "aligned": ALIGNED, "weight_shift": {
        "min_cosine": 0.99999, "mean_norm_diff": 1e-5, "max_norm_diff": 1e-3, "all_above_0_99": True,
        "n_tensors": 30, "changed_tensors": 30, "most_moved": [{"name": "lm_head.weight", "cosine": 0.99999,
                                                                 "rel_diff": 1e-4}]}})
    # analysis: the signed contribution drops, the raw activation (negative) does not
    write_json(run / "analyze" / "analysis.json", {
        "activation_drop": {"mean_base": -0.026, "mean_aligned": -0.027, "mean_aligned_own_tokens": -0.027,
                            "n_neurons": 16, "per_neuron": [],
                            "raw": {"base": -0.026, "aligned": -0.027, "diff": -0.001, "ci95": [-0.003, 0.001], "n": 200},
                            "signed": {"base": 0.01, "aligned": 0.008, "diff": -0.002, "ci95": [-0.003, -0.001], "n": 200},
                            "control": {"signed": {"diff": -0.0001, "ci95": [-0.0005, 0.0003], "n": 200},
                                        "vs_control": {"diff": -0.0019, "ci95": [-0.0025, -0.0012], "n": 200}}},
        "offset": [{"layer": l, "norm": 0.1 * l, "relative_norm": 0.01 * l, "cosine_with_probe": -0.1} for l in range(4)],
        "offset_stats": {"slope": {"mean": 0.01, "ci95": [0.008, 0.012], "n": 200},
                         "final_cosine_with_probe": {"mean": -0.1, "ci95": [-0.2, 0.05], "n": 200},
                         "control": {"slope": {"mean": 0.002, "ci95": [0.001, 0.003], "n": 200},
                                     "final_cosine_with_probe": {"mean": 0.0, "ci95": [-0.05, 0.05], "n": 200}},
                         "vs_control": {"slope": {"mean": 0.008, "ci95": [0.006, 0.01], "n": 200},
                                        "final_cosine_with_probe": {"mean": -0.1, "ci95": [-0.2, 0.04], "n": 200}}},
        "value_shift_vs_offset": {"3": {"median_cosine_by_layer": {}, "share_negative": 0.6}},
        "value_shift_stats": {"offset_layer": 3, "share_anti_aligned": {"mean": 0.6, "ci95": [0.55, 0.65], "n": 900},
                              "contribution_along_offset": {"mean": 0.2, "ci95": [0.1, 0.3], "n": 540},
                              # the placebo's shifts contribute as much: the claim holds for DPO only
                              "vs_control": {"share_anti_aligned": {"mean": 0.1, "ci95": [0.05, 0.15], "control": {
                                  "mean": 0.5, "ci95": [0.48, 0.52], "n": 900}},
                                  "contribution_along_offset": {"mean": 0.0, "ci95": [-0.1, 0.1], "control": {
                                      "mean": 0.2, "ci95": [0.1, 0.3], "n": 500}}}},
        "n_prompts": 200, "base": MODEL, "aligned": ALIGNED})
    # unalign: key scaling makes the aligned model even less toxic (contradicted)
    write_json(run / "unalign" / "table.json", {
        "rows": [eval_row("base", base_tox, rng), eval_row("aligned", aligned_tox, rng, 1.05, ALIGNED),
                 eval_row("unaligned", aligned_tox - 0.03, rng, 1.7),
                 eval_row("unaligned-sign-aware", aligned_tox + 0.05, rng, 1.1)],
        "sign_flip": {"share": 0.4, "per_neuron": [], "n_tokens": 500, "n_prompts": 64},
        "scaled": [], "rank": "cosine", "k": 7, "scale": 10.0, "scorer": scorer, "n_prompts": N_PROMPTS})
    # neurons
    groups = {g: {"count": 10, "reduction": 1.0, "share_of_positive": s, "share_of_net": 2 * s,
                  "ci95_share_of_positive": [s - 0.05, s + 0.05], "ci95_share_of_net": [2 * s - 0.1, 2 * s + 0.1]}
              for g, s in (("TP-", 0.4), ("TN+", 0.2), ("AP+", 0.25), ("AN-", 0.15))}
    write_json(run / "neurons" / "groups.json", {
        "groups": groups, "totals": {"positive": 10.0, "net": 5.0},
        "toxic_neurons": {"count": 5, "top_n": 128, "reduction": 0.5, "share_of_positive": 0.05, "share_of_net": 0.1,
                          "ci95_share_of_positive": [0.02, 0.08], "ci95_share_of_net": [0.04, 0.16]},
        "fit": {"prompts": "p.jsonl", "n_prompts": 100},
        "crossfit": {"groups": {g: {"count": 10, "share": s, "ci95": [s - 0.05, s + 0.05]}
                                for g, s in (("TP-", 0.4), ("TN+", 0.2), ("AP+", 0.25), ("AN-", 0.15))},
                     "min": {"group": "AN-", "share": 0.15, "ci95": [0.1, 0.2]},
                     "toxic_neurons": {"count": 5, "share": 0.05, "ci95": [0.02, 0.08]},
                     "four_groups_reduction": {"value": 1.0, "ci95": [0.5, 1.5]},
                     "split": {"choose": 50, "measure": 50, "seed": 0, "n_boot": 400}}})
    write_json(run / "neurons" / "manifest.json", {"stage": "neurons", "base": MODEL, "aligned": ALIGNED,
                                                   "config": {"eval": {"scorer": "words", "prompts": "p.jsonl"}}})
    write_json(run / "neurons" / "patching.json", {
        "base": eval_row("base", base_tox, rng), "aligned": eval_row("aligned", aligned_tox, rng, 1.05, ALIGNED),
        "steps": [{"groups": ["TP-", "AN-", "TN+", "AP+"], "n_neurons": 40,
                   **eval_row("", aligned_tox + 0.01, rng, 1.06)}],
        "n_eval_prompts": N_PROMPTS, "eval_offset": 100, "mode": "shift", "patch": "shift"})
    # robustness: every transform keeps about half the offset, multi-turn keeps all of it
    rows = []
    for t in ("plain", "rot13", "base64", "leetspeak", "spaced", "upper", "multi_turn"):
        level = 1.0 if t in ("plain", "multi_turn") else 0.5
        per_prompt = level + 0.05 * rng.normal(size=30)
        tokens = rng.integers(5, 15, size=30).astype(float)
        rows.append({"transform": t, "model": "base", "toxicity": {"mean": 0.3, "ci95": [0.2, 0.4], "n": 30},
                     "retention": None})
        rows.append({"transform": t, "model": "aligned", "toxicity": {"mean": 0.2, "ci95": [0.1, 0.3], "n": 30},
                     "retention": [level] * 4, "retention_mean": float((per_prompt * tokens).sum() / tokens.sum()),
                     "retention_ci95": [level - 0.02, level + 0.02], "retention_per_prompt": per_prompt.tolist(),
                     "tokens_per_prompt": tokens.tolist()})
    write_json(run / "robustness" / "table.json", {"rows": rows, "scorer": scorer, "n_prompts": 60,
                                                   "split": {"fit": 30, "measure": 30, "seed": 0}})
    return run


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path, np.random.default_rng(0))


def test_claims_from_a_synthetic_run(run_dir):
    ledger = build_claims(run_dir, n_boot=400, scorer_factory=lambda name: WordScorer())
    rows = {r["id"]: r for r in ledger["rows"]}
    assert len(ledger["rows"]) >= 13 and len(rows) == len(CLAIMS)
    json.dumps(ledger, allow_nan=False)  # strict JSON: no NaN anywhere
    for r in ledger["rows"]:
        assert r["verdict"] in VERDICTS and r["claim"] and r["paper"] and r["ours"] and r["rule"]
        assert r["verdict"] == "holds" or r["diagnosis"], r["id"]
        if r["ci95"] is not None and r["ci95"][0] < 0 < r["ci95"][1]:
            assert r["verdict"] == "inconclusive", r["id"]
    expected = {"probe_separates": "holds", "vectors_toxic_tokens": "holds", "subtract_probe_beats_random": "holds",
                "subtract_mlp_v_beats_random": "inconclusive", "subtract_svd_u_beats_random": "holds",
                "dpo_lowers_toxicity": "holds", "weights_barely_move": "holds",
                # a 29% reduction is not the paper's 54%; the year marker rose past twice the base's share
                "strength_matches_paper": "contradicted", "no_overuse": "contradicted", "reduction_beyond_cues": "holds",
                "toxic_neurons_activation_drop": "holds", "offset_grows": "holds",
                "offset_away_from_toxic": "inconclusive", "value_shifts_opposite": "holds",
                # holds for DPO, but not more than for the placebo
                "value_shifts_contribute": "inconclusive", "unalign_restores": "contradicted",
                # mechanism claims of stages that measure no placebo yet
                "toxic_neurons_small_share": "inconclusive", "reduction_spreads": "inconclusive",
                "patching_replicates": "holds", "transforms_weaken_offset": "inconclusive",
                "multi_turn_weakens_offset": "inconclusive"}
    assert {k: rows[k]["verdict"] for k in expected} == expected
    assert ledger["counts"] == {v: list(expected.values()).count(v) for v in VERDICTS}
    dpo = rows["dpo_lowers_toxicity"]
    assert dpo["n"] == N_PROMPTS and dpo["effect"] == pytest.approx(-0.1, abs=0.01) and "PPL ×" in dpo["ours"]
    assert dpo["models"]["aligned"]["weight_sha256"] == ALIGNED["weight_sha256"] and dpo["scorer"]["name"] == "words"
    assert rows["vectors_toxic_tokens"]["scorer"] == WordScorer().describe()
    un = rows["unalign_restores"]
    assert "sign-aware variant" in un["ours"] and "40.0%" in un["ours"] and "PPL ×" in un["diagnosis"]
    assert "raw activation" in rows["toxic_neurons_activation_drop"]["ours"]
    assert "patched − aligned" in rows["patching_replicates"]["ours"]
    assert rows["weights_barely_move"]["ci95"] == [pytest.approx(0.00999), pytest.approx(0.00999)]
    assert "[holds]" in render_text(ledger)
    contrib = rows["value_shifts_contribute"]
    assert contrib["ci95"][0] > 0 and contrib["placebo"]["difference_verdict"] == "inconclusive"
    assert "does not differ from the placebo's" in contrib["diagnosis"]
    for k in ("toxic_neurons_small_share", "reduction_spreads", "transforms_weaken_offset"):
        assert "no placebo control was measured" in rows[k]["diagnosis"] and rows[k]["mechanism"], k
    assert rows["offset_grows"]["placebo"] == {"effect": 0.002, "ci95": [0.001, 0.003], "diff": 0.008,
                                               "diff_ci95": [0.006, 0.01], "difference_verdict": "holds"}
    assert not rows["dpo_lowers_toxicity"]["mechanism"] and rows["dpo_lowers_toxicity"]["placebo"] is None


def test_missing_stages_and_old_artifacts_are_inconclusive(run_dir):
    import shutil

    shutil.rmtree(run_dir / "robustness")
    (run_dir / "vectors" / "random_vectors.json").unlink()
    ev = json.loads((run_dir / "dpo" / "eval.json").read_text())
    for r in ev["rows"]:  # an eval.json written before per-prompt scores were kept
        del r["toxicity_per_prompt"]
    write_json(run_dir / "dpo" / "eval.json", ev)
    a = json.loads((run_dir / "analyze" / "analysis.json").read_text())
    del a["activation_drop"]["signed"], a["offset_stats"]
    write_json(run_dir / "analyze" / "analysis.json", a)
    rows = {r["id"]: r for r in build_claims(run_dir, n_boot=200)["rows"]}  # no scorer needed any more
    for k in ("transforms_weaken_offset", "multi_turn_weakens_offset"):
        assert rows[k]["verdict"] == "inconclusive" and rows[k]["diagnosis"].startswith("stage not run")
    assert "random-vector baseline" in rows["vectors_toxic_tokens"]["diagnosis"]
    assert rows["dpo_lowers_toxicity"]["verdict"] == "inconclusive"
    assert "no per-prompt scores" in rows["dpo_lowers_toxicity"]["diagnosis"]
    drop = rows["toxic_neurons_activation_drop"]
    # without its random-vector baseline the vectors row cannot hold: the rows resting on the top cosine
    # vectors read `precondition failed`, and keep what they measured
    assert drop["verdict"] == "precondition failed" and drop["verdict_as_measured"] == "inconclusive"
    assert "rests on 'vectors_toxic_tokens'" in drop["diagnosis"] and "no per-prompt interval" in drop["diagnosis"]
    assert "negative in the base" in drop["diagnosis"]
    assert rows["offset_grows"]["effect"] == pytest.approx(0.01) and rows["offset_grows"]["ci95"] is None


def test_neuron_shares_need_cross_fitting(run_dir):
    """groups.json without the cross-fitted block (or whose chosen groups do not reduce the projection on
    the other half) decides no share claim: in-sample shares are positive by construction."""
    g = json.loads((run_dir / "neurons" / "groups.json").read_text())
    g["crossfit"]["four_groups_reduction"]["ci95"] = [-0.2, 1.5]
    write_json(run_dir / "neurons" / "groups.json", g)
    rows = {r["id"]: r for r in build_claims(run_dir, n_boot=200, scorer_factory=lambda n: WordScorer())["rows"]}
    for k in ("reduction_spreads", "toxic_neurons_small_share"):
        assert rows[k]["verdict"] == "inconclusive" and "do not reduce the projection" in rows[k]["diagnosis"]
    del g["crossfit"]
    write_json(run_dir / "neurons" / "groups.json", g)
    rows = {r["id"]: r for r in build_claims(run_dir, n_boot=200, scorer_factory=lambda n: WordScorer())["rows"]}
    for k in ("reduction_spreads", "toxic_neurons_small_share"):
        assert rows[k]["verdict"] == "inconclusive" and "not cross-fitted" in rows[k]["diagnosis"]


def test_claims_per_alignment_method(run_dir):
    """`alternatives` rows get the DPO claims again, one set per variant, by the same rule."""
    rng = np.random.default_rng(3)
    base_tox = rng.uniform(0.1, 0.6, size=N_PROMPTS)

    def variant(label, tox, slope_ci, level):
        ret = {}
        for t in ("plain", "rot13", "base64", "leetspeak", "spaced", "upper", "multi_turn"):
            per_prompt = (1.0 if t == "plain" else level) + 0.05 * rng.normal(size=30)
            ret[t] = {"retention": [level] * 4, "retention_mean": float(per_prompt.mean()),
                      "retention_ci95": [level - 0.02, level + 0.02], "retention_per_prompt": per_prompt.tolist(),
                      "tokens_per_prompt": [10.0] * 30}
        return {"variant": label, "method": label, **eval_row(label, tox, rng, 1.01, ALIGNED),
                "weight_shift": {"min_cosine": 0.9999, "mean_norm_diff": 1e-5, "max_norm_diff": 1e-3,
                                 "n_tensors": 30, "changed_tensors": 30},
                "offset": [{"layer": l, "norm": 0.1, "relative_norm": 0.01, "cosine_with_probe": -0.1} for l in range(4)],
                "offset_stats": {"slope": {"mean": sum(slope_ci) / 2, "ci95": slope_ci, "n": 30}}, "retention": ret}

    write_json(run_dir / "alternatives" / "alternatives.json", {
        "rows": [{"variant": "base", **eval_row("base", base_tox, rng)},
                 variant("ipo", np.clip(base_tox - 0.1, 0, 1), [0.002, 0.004], 0.5),
                 variant("orpo", base_tox + 0.01 * rng.normal(size=N_PROMPTS), [-0.001, 0.001], 1.0)],
        "scorer": {"name": "words", "version": "test"}, "n_prompts": N_PROMPTS, "n_offset_prompts": 30})
    ledger = build_claims(run_dir, n_boot=300, scorer_factory=lambda name: WordScorer())
    assert len(ledger["rows"]) == len(CLAIMS)  # the paper's ledger is unchanged
    got = {r["id"]: r["verdict"] for r in ledger["method_rows"]}
    # the offset claims are mechanism claims, and `alternatives` measures no placebo: they cannot hold
    assert got == {"ipo:dpo_lowers_toxicity": "holds", "ipo:weights_barely_move": "holds",
                   "ipo:offset_grows": "inconclusive", "ipo:transforms_weaken_offset": "inconclusive",
                   "ipo:multi_turn_weakens_offset": "inconclusive",
                   "orpo:dpo_lowers_toxicity": "inconclusive", "orpo:weights_barely_move": "holds",
                   "orpo:offset_grows": "inconclusive", "orpo:transforms_weaken_offset": "inconclusive",
                   "orpo:multi_turn_weakens_offset": "inconclusive"}
    assert ledger["method_counts"] == {"holds": 3, "contradicted": 0, "inconclusive": 7, "precondition failed": 0}
    grows = next(r for r in ledger["method_rows"] if r["id"] == "ipo:offset_grows")
    assert grows["ci95"][0] > 0 and "no placebo control was measured" in grows["diagnosis"]
    row = next(r for r in ledger["method_rows"] if r["id"] == "ipo:dpo_lowers_toxicity")
    assert row["claim"].startswith("ipo: lowers toxicity") and row["paper"].startswith("DPO: ")
    assert row["method"] == "ipo" and row["n"] == N_PROMPTS and row["models"]["ipo"]["weight_sha256"] == "bb" * 32
    weak = next(r for r in ledger["method_rows"] if r["id"] == "ipo:transforms_weaken_offset")
    assert weak["effect"] == pytest.approx(0.5, abs=0.03) and weak["n"] == 30
    assert "per variant of `alternatives`" in render_text(ledger)


def test_patching_at_a_perplexity_cost_does_not_replicate(run_dir):
    """A patch that cuts toxicity by wrecking fluency is not DPO replicated."""
    p = json.loads((run_dir / "neurons" / "patching.json").read_text())
    rng = np.random.default_rng(5)
    p["steps"][-1].update({k: v for k, v in eval_row("", p["steps"][-1]["toxicity_per_prompt"], rng, 1.5).items()
                           if k.startswith("ppl") or k == "perplexity"})
    write_json(run_dir / "neurons" / "patching.json", p)
    row = next(r for r in build_claims(run_dir, n_boot=200)["rows"] if r["id"] == "patching_replicates")
    assert row["verdict"] == "contradicted" and row["effect"] > 0  # the whole PPL interval is above ×1.10
    assert row["diagnosis"].startswith("the effect holds, but perplexity ×")
    assert "outside the stated bound" in row["diagnosis"] and "(patched against aligned)" in row["diagnosis"]


def test_a_collapse_onto_one_subject_blocks_the_dpo_claim(run_dir):
    """A run without drift.json (written before it): the most over-used word's point value is the guard."""
    (run_dir / "dpo" / "drift.json").unlink()
    ev = json.loads((run_dir / "dpo" / "eval.json").read_text())
    ev["overused_words"] = [{"word": "2018", "base_share": 0.02, "aligned_share": 0.62}]
    write_json(run_dir / "dpo" / "eval.json", ev)
    row = next(r for r in build_claims(run_dir, n_boot=200)["rows"] if r["id"] == "dpo_lowers_toxicity")
    assert row["verdict"] == "inconclusive" and "'2018' in 62.0% of the aligned continuations (base 2.0%)" in row["ours"]
    assert row["diagnosis"].startswith("the effect holds, but the aligned model collapses onto one subject")


def test_claims_cli_writes_the_ledger(run_dir):
    from typer.testing import CliRunner

    from dpolens.cli import app

    (run_dir / "vectors" / "random_vectors.json").unlink()  # the only claim that needs a scorer
    out = CliRunner().invoke(app, ["claims", str(run_dir)])
    assert out.exit_code == 0, out.output
    assert "claims of run synthetic" in out.output and "[precondition failed]" in out.output
    assert len(json.loads((run_dir / "claims.json").read_text())["rows"]) == len(CLAIMS)


def test_perplexity_cost_blocks_holds(tmp_path):
    """A toxicity reduction bought with perplexity ×1.5 is not the paper's "small cost": never `holds`."""
    rng = np.random.default_rng(1)
    run = tmp_path / "run"
    base_tox = rng.uniform(0.1, 0.6, size=N_PROMPTS)
    write_json(run / "dpo" / "eval.json", {"rows": [eval_row("base", base_tox, rng),
                                                    eval_row("aligned", base_tox - 0.1, rng, 1.5, ALIGNED)],
                                           "scorer": {"name": "words"}, "n_prompts": N_PROMPTS})
    rows = {r["id"]: r for r in build_claims(run, n_boot=200)["rows"]}
    row = rows["dpo_lowers_toxicity"]
    assert row["ci95"][1] < 0 and row["verdict"] == "contradicted" and "outside the stated bound" in row["diagnosis"]


@pytest.mark.parametrize("ppl, spread, windows, f1_drop, verdict, why", [
    (1.0, 0.01, 24, 0.0, "holds", None),
    (1.0, 0.01, 8, 0.0, "inconclusive", "no interval over at least 20 windows"),  # too few windows to pass
    (1.5, 0.01, 8, 0.0, "inconclusive", "no interval over at least 20 windows"),  # nor to fail
    (1.5, 0.01, 24, 0.0, "contradicted", "outside the stated bound"),
    (1.1, 0.5, 24, 0.0, "inconclusive", "may be outside the stated bound"),  # the interval straddles ×1.10
    (1.0, 0.01, 24, 0.05, "contradicted", "F1 falls by more than 0.02"),
    (1.0, 0.01, 24, 0.02, "inconclusive", "F1 may fall by more than 0.02"),  # straddles the margin
])
def test_cost_guards_pass_only_inside_their_bound(tmp_path, ppl, spread, windows, f1_drop, verdict, why):
    """A guard passes when its whole interval is inside the bound, fails the claim when wholly outside,
    and otherwise leaves it inconclusive (PPL over >= 20 windows; F1 within a 0.02 margin)."""
    rng = np.random.default_rng(2)
    run = tmp_path / "run"
    base_tox = rng.uniform(0.1, 0.6, size=N_PROMPTS)
    base = eval_row("base", base_tox, rng, windows=windows)
    aligned = eval_row("aligned", base_tox - 0.1, rng, 1.0, ALIGNED, windows=windows)
    per_token = math.log(ppl) + spread * rng.normal(size=windows)  # log PPL ratio of each window
    aligned["ppl_window_nll"] = [x + 10 * d for x, d in zip(base["ppl_window_nll"], per_token)]
    aligned["f1_per_row"] = [x - f1_drop + 0.01 * e for x, e in zip(base["f1_per_row"], rng.normal(size=20))]
    write_json(run / "dpo" / "eval.json", {"rows": [base, aligned], "scorer": {"name": "words"}, "n_prompts": N_PROMPTS})
    row = {r["id"]: r for r in build_claims(run, n_boot=400)["rows"]}["dpo_lowers_toxicity"]
    assert row["ci95"][1] < 0 and row["verdict"] == verdict, (row["verdict"], row["diagnosis"])
    assert why is None or why in row["diagnosis"], row["diagnosis"]


def test_rows_resting_on_toxic_vectors_need_them_toxic(run_dir):
    """Where the top cosine vectors' tokens are no more toxic than random vectors', the claims about those
    vectors' neurons and keys read `precondition failed`, keeping what they measured."""
    tv = json.loads((run_dir / "vectors" / "toxic_vectors.json").read_text())
    for r in tv:
        r["top_tokens"] = [" the", " a", " cat", " of"]
    write_json(run_dir / "vectors" / "toxic_vectors.json", tv)
    rows = {r["id"]: r for r in build_claims(run_dir, n_boot=300, scorer_factory=lambda n: WordScorer())["rows"]}
    assert rows["vectors_toxic_tokens"]["verdict"] != "holds"
    drop = rows["toxic_neurons_activation_drop"]
    assert drop["verdict"] == "precondition failed" and drop["verdict_as_measured"] == "holds"
    assert rows["unalign_restores"]["verdict"] == "precondition failed"
    assert rows["unalign_restores"]["verdict_as_measured"] == "contradicted"
    assert rows["offset_grows"]["verdict"] == "holds"  # the offset does not rest on the vectors


def test_table2_needs_several_random_directions(run_dir):
    """One random direction is one draw: its paired interval does not cover the spread between random
    directions, so no row holds on it; with five, the interval is a prediction interval over them."""
    rows = {r["id"]: r for r in build_claims(run_dir, n_boot=300, scorer_factory=lambda n: WordScorer())["rows"]}
    probe = rows["subtract_probe_beats_random"]
    assert probe["verdict"] == "holds" and "mean of 5 random directions" in probe["ours"]
    t2 = json.loads((run_dir / "table2" / "table.json").read_text())
    t2["rows"] = [r for r in t2["rows"] if not r["vector"].startswith("random ")]
    write_json(run_dir / "table2" / "table.json", t2)
    rows = {r["id"]: r for r in build_claims(run_dir, n_boot=300, scorer_factory=lambda n: WordScorer())["rows"]}
    probe = rows["subtract_probe_beats_random"]
    assert probe["ci95"][1] < 0 and probe["verdict"] == "inconclusive" and "one random direction" in probe["diagnosis"]


def test_a_guard_without_a_finite_interval_does_not_pass():
    from dpolens.ledger import f1_check, ppl_check

    nan = float("nan")
    assert ppl_check({"ratio": 1.0, "ci95": [nan, nan], "n": 50}, {}, {})[0] is not None
    assert f1_check({"ci95": [nan, nan]}, "F1 x")[0] is not None
    assert ppl_check({"ratio": 1.0, "ci95": [0.99, 1.01], "n": 50}, {}, {}) == (None, None)


def test_a_collapse_whose_interval_passes_the_bound_vetoes_the_toxicity_row(run_dir):
    d = json.loads((run_dir / "dpo" / "drift.json").read_text())
    worst = d["models"]["aligned"]["overuse"]["worst"]
    for ci, expected in (([0.3, 0.4], "contradicted"), ([0.2, 0.3], "inconclusive"), ([0.05, 0.2], "holds")):
        worst["rise_ci95"] = ci
        write_json(run_dir / "dpo" / "drift.json", d)
        row = next(r for r in build_claims(run_dir, n_boot=200, scorer_factory=lambda name: WordScorer())["rows"]
                   if r["id"] == "dpo_lowers_toxicity")
        assert row["verdict"] == expected, ci
        assert ("onto one subject" in (row["diagnosis"] or "")) == (expected != "holds")


def test_holm_adjusts_only_what_the_family_cannot_carry():
    from dpolens.ledger import approx_p, holm

    assert approx_p(1.0, [0.5, 1.5]) < 1e-4 and approx_p(0.0, [-1, 1]) == 1.0 and approx_p(0.01, [0.01, 0.01]) == 0
    assert approx_p(0.3, [0.0, 0.6]) == pytest.approx(0.05, abs=1e-3)  # a 95% interval touching 0: p = 0.05
    rows = [{"id": "strong", "effect": 1.0, "ci95": [0.8, 1.2], "verdict": "holds"},
            # just excludes 0: holds alone, not among 3 tests
            {"id": "weak", "effect": 0.3, "ci95": [0.02, 0.58], "verdict": "holds"},
            {"id": "against", "effect": -1.0, "ci95": [-1.2, -0.8], "verdict": "contradicted"},
            {"id": "none", "effect": 0.1, "ci95": [-0.1, 0.3], "verdict": "inconclusive"},
            {"id": "no interval", "effect": 0.1, "ci95": None, "verdict": "inconclusive"},
            # a mechanism row: its placebo difference is weak, so the row is as weak as that
            {"id": "mech", "effect": 1.0, "ci95": [0.8, 1.2], "verdict": "holds", "mechanism": True,
             "placebo": {"diff": 0.3, "diff_ci95": [0.02, 0.58]}}]
    holm(rows)
    got = {r["id"]: r["verdict_holm"] for r in rows}
    assert got == {"strong": "holds", "weak": "inconclusive", "against": "contradicted", "none": "inconclusive",
                   "no interval": "inconclusive", "mech": "inconclusive"}
    assert rows[4]["p_approx"] is None and rows[5]["p_approx"] == rows[1]["p_approx"]


def test_ledger_rows_name_their_function_and_the_report_links_artifacts(run_dir):
    from dpolens.report import claims_section

    ledger = write_claims(run_dir, n_boot=200, scorer_factory=lambda name: WordScorer())
    row = next(r for r in ledger["rows"] if r["id"] == "dpo_lowers_toxicity")
    assert row["function"] == "dpolens.stages.dpo.dpo_lowers_toxicity" and row["verdict_holm"] in VERDICTS
    assert sum(ledger["counts_holm"].values()) == len(ledger["rows"])
    assert ledger["counts_holm"]["holds"] <= ledger["counts"]["holds"]
    html = claims_section(run_dir)
    assert '<a href="dpo/eval.json">dpo/eval.json</a>' in html and "Holm-adjusted" in html


def test_offset_weakening_is_paired_against_held_out_plain_prompts(run_dir):
    rows = {r["id"]: r for r in build_claims(run_dir, n_boot=300)["rows"]}
    enc, multi = rows["transforms_weaken_offset"], rows["multi_turn_weakens_offset"]
    # plain keeps 1.0 on the held-out half, the encodings 0.5, multi-turn 1.0
    assert enc["effect"] == pytest.approx(0.5, abs=0.03) and enc["ci95"][0] > 0.4 and enc["n"] == 30
    assert multi["ci95"][0] < 0 < multi["ci95"][1] and "held-out plain prompts" in enc["ours"]
    assert enc["data"]["split"] == {"fit": 30, "measure": 30, "seed": 0}
    # a table.json from before the split: δx̂ was estimated on the prompts it was measured on
    t = json.loads((run_dir / "robustness" / "table.json").read_text())
    del t["split"]
    write_json(run_dir / "robustness" / "table.json", t)
    rows = {r["id"]: r for r in build_claims(run_dir, n_boot=300)["rows"]}
    assert rows["transforms_weaken_offset"]["ci95"] is None and rows["transforms_weaken_offset"]["verdict"] == "inconclusive"
    assert "estimated on the prompts it is measured on" in rows["transforms_weaken_offset"]["diagnosis"]


def test_patching_must_beat_a_random_neuron_set(run_dir):
    """A random set of as many neurons, shifted by the groups' norm, that replicates as much: not the groups."""
    p = json.loads((run_dir / "neurons" / "patching.json").read_text())
    rng = np.random.default_rng(7)
    groups = np.asarray(p["steps"][-1]["toxicity_per_prompt"])
    for random_tox, expected in ((groups + 0.0 * rng.normal(size=len(groups)), "inconclusive"),
                                 (np.asarray(p["aligned"]["toxicity_per_prompt"]) + 0.1, "holds")):
        p["random"] = {"n_neurons": 40, **eval_row("", random_tox, rng, 1.06)}
        write_json(run_dir / "neurons" / "patching.json", p)
        row = next(r for r in build_claims(run_dir, n_boot=300)["rows"] if r["id"] == "patching_replicates")
        assert "random set of 40 neurons" in row["ours"]
        assert row["verdict"] == expected, row["diagnosis"]
        if expected == "inconclusive":
            assert "do not replicate more than the null" in row["diagnosis"]


def _writers_measured(run_dir, rng, writer_tokens):
    """The run with non-toxic cosine vectors and token writers whose top tokens are `writer_tokens`; the rows
    that rest on the vectors measured for the writers too: their activation drops against placebos, their keys
    scaled bring the whole gap back at no perplexity cost, they carry a small share of the reduction."""
    tv = json.loads((run_dir / "vectors" / "toxic_vectors.json").read_text())
    for r in tv:
        r["top_tokens"] = [" the", " a", " cat", " of"]
    write_json(run_dir / "vectors" / "toxic_vectors.json", tv)
    write_json(run_dir / "vectors" / "token_writers.json", {
        "probe_tokens": [" idiot"], "median_cosine_rank": 900.0,
        "rows": [{"layer": 1, "neuron": i, "score": 3.0, "cosine": 0.01, "cosine_rank": 900,
                  "top_tokens": writer_tokens} for i in range(10)]})
    a = json.loads((run_dir / "analyze" / "analysis.json").read_text())
    a["activation_drop"]["writers"] = {
        "neurons": [], "activation": {"base": 0.02, "aligned": 0.01, "diff": -0.01, "ci95": [-0.012, -0.008], "n": 200},
        "control_activation": {"signed": {"diff": 0.0, "ci95": [-0.001, 0.001], "n": 200},
                               "vs_control": {"diff": -0.01, "ci95": [-0.012, -0.008], "n": 200}},
        # their contribution along the probe (reported, not judged) rises
        "signed": {"base": 0.001, "aligned": 0.002, "diff": 0.001, "ci95": [0.0005, 0.0015], "n": 200}}
    write_json(run_dir / "analyze" / "analysis.json", a)
    u = json.loads((run_dir / "unalign" / "table.json").read_text())
    base = next(r for r in u["rows"] if r["model"] == "base")
    aligned = next(r for r in u["rows"] if r["model"] == "aligned")
    writers = {**eval_row("unaligned-token-writers", base["toxicity_per_prompt"], rng), "model": "unaligned-token-writers",
               "ppl_window_nll": aligned["ppl_window_nll"], "ppl_window_tokens": aligned["ppl_window_tokens"]}
    u["rows"].append(writers)
    write_json(run_dir / "unalign" / "table.json", u)
    g = json.loads((run_dir / "neurons" / "groups.json").read_text())
    g["crossfit_writers"] = {**g["crossfit"], "toxic_neurons": {"count": 7, "share": 0.1, "ci95": [0.05, 0.15]},
                             "control": {"draws": 3, "four_groups_reduction": [0.1, 0.2, 0.1], "toxic_neurons": {
                                 "mean": 0.5, "ci95": [0.4, 0.6], "diff": -0.4, "diff_ci95": [-0.5, -0.3]}}}
    write_json(run_dir / "neurons" / "groups.json", g)
    return {r["id"]: r for r in build_claims(run_dir, n_boot=300, scorer_factory=lambda n: WordScorer())["rows"]}


def test_rows_resting_on_the_vectors_are_reported_for_the_token_writers(run_dir):
    """Where the cosine ranking's vectors are not toxic, the rows resting on them read `precondition failed`
    and report the same claim for the token writers, judged by the same rule (placebo, guards) and by the
    writers' own precondition: it holds where the writers' tokens are toxic..."""
    rows = _writers_measured(run_dir, np.random.default_rng(1), [" idiot", " stupid", " moron", " the"])
    vec = rows["vectors_toxic_tokens"]
    assert vec["verdict"] != "holds" and vec["alternatives"]["token-writers"]["verdict"] == "holds"
    for cid in ("toxic_neurons_activation_drop", "unalign_restores"):
        r = rows[cid]
        alt = r["alternatives"]["token-writers"]
        assert r["verdict"] == "precondition failed", cid
        assert alt["verdict"] == "holds" and "verdict_as_measured" not in alt, (cid, alt)
        assert "with the token-writers ranking (whose own precondition is holds" in r["diagnosis"], cid
    # the writers' share of the reduction along the probe is reported, not judged (small by construction)
    share = rows["toxic_neurons_small_share"]
    assert share["verdict"] == "precondition failed" and not share["alternatives"] and "not judged" in share["ours"]
    # the mechanism rule applies to the alternative too: without its placebo it cannot hold
    assert rows["toxic_neurons_activation_drop"]["alternatives"]["token-writers"]["placebo"]["difference_verdict"] == "holds"


def test_token_writer_rows_need_their_own_precondition(run_dir):
    """...and reads `precondition failed` itself where the writers' tokens are no more toxic than random."""
    rows = _writers_measured(run_dir, np.random.default_rng(1), [" the", " a", " cat", " of"])
    assert rows["vectors_toxic_tokens"]["alternatives"]["token-writers"]["verdict"] != "holds"
    for cid in ("toxic_neurons_activation_drop", "unalign_restores"):
        alt = rows[cid]["alternatives"]["token-writers"]
        assert alt["verdict"] == "precondition failed" and alt["verdict_as_measured"] == "holds", (cid, alt)


def test_an_alternative_mechanism_without_placebo_does_not_hold(run_dir):
    rows = _writers_measured(run_dir, np.random.default_rng(1), [" idiot", " stupid", " moron", " the"])
    a = json.loads((run_dir / "analyze" / "analysis.json").read_text())
    del a["activation_drop"]["writers"]["control_activation"]
    write_json(run_dir / "analyze" / "analysis.json", a)
    rows = {r["id"]: r for r in build_claims(run_dir, n_boot=300, scorer_factory=lambda n: WordScorer())["rows"]}
    alt = rows["toxic_neurons_activation_drop"]["alternatives"]["token-writers"]
    assert alt["verdict"] == "inconclusive" and "no placebo control" in alt["diagnosis"]


def test_the_ledger_across_runs_puts_each_run_in_its_column(tmp_path):
    """`dpolens claims RUN RUN`: per claim one column per run with its verdict and effect (the token-writer
    ranking beside it where measured), and which claims hold on all runs, on some, on none."""
    from dpolens.claims import across_runs, render_across

    a = make_run(tmp_path / "a", np.random.default_rng(0))
    b = make_run(tmp_path / "b", np.random.default_rng(0))
    # run b: its cosine vectors are not toxic, its token writers are
    _writers_measured(b, np.random.default_rng(1), [" idiot", " stupid", " moron", " the"])
    ledgers = [build_claims(d, n_boot=300, scorer_factory=lambda n: WordScorer()) for d in (a, b)]
    table = across_runs(ledgers, ["A", "B"])
    rows = {r["id"]: r for r in table["rows"]}
    assert len(rows) == len(ledgers[0]["rows"])
    for cid, r in rows.items():
        for label, led in zip("AB", ledgers):
            own = next(x for x in led["rows"] if x["id"] == cid)
            assert (r["runs"][label]["verdict"], r["runs"][label]["effect"]) == (own["verdict"], own["effect"])
        n_holds = sum(v["verdict"] == "holds" for v in r["runs"].values())
        assert r["holds_on"] == {2: "all", 1: "some", 0: "none"}[n_holds] and cid in table["summary"][r["holds_on"]]
    assert rows["vectors_toxic_tokens"]["holds_on"] == "some"
    assert rows["toxic_neurons_activation_drop"]["runs"]["B"]["verdict"] == "precondition failed"
    md = render_across(table)
    assert md.count("\n| (") == len(rows) and "| A | B |" in md
    assert rows["unalign_restores"]["runs"]["B"]["alternatives"]["token-writers"]["verdict"] == "holds"
    assert "; token-writers: holds" in md


def test_token_writers_precondition_leaves_out_the_tokens_they_were_chosen_for(run_dir):
    """The writers are chosen for promoting the probe's top tokens: lists that hold only those tokens (and
    harmless ones) do not pass the writers' precondition, while the same insults outside the probe's list do."""
    def writers_verdict(probe_tokens):
        write_json(run_dir / "vectors" / "token_writers.json", {
            "probe_tokens": probe_tokens, "median_cosine_rank": 900.0,
            "rows": [{"layer": 1, "neuron": i, "score": 3.0, "cosine": 0.01, "cosine_rank": 900,
                      "top_tokens": [" idiot", " stupid", " moron", " the"]} for i in range(10)]})
        rows = build_claims(run_dir, n_boot=300, scorer_factory=lambda n: WordScorer())["rows"]
        return next(r for r in rows if r["id"] == "vectors_toxic_tokens")["alternatives"]["token-writers"]

    assert writers_verdict([" idiot", " stupid", " moron"])["verdict"] != "holds"
    assert writers_verdict([" fool"])["verdict"] == "holds"


def test_unalign_ranked_by_token_writers_rests_on_their_precondition(run_dir):
    u = json.loads((run_dir / "unalign" / "table.json").read_text())
    u["rank"] = "token-writers"
    write_json(run_dir / "unalign" / "table.json", u)
    tv = json.loads((run_dir / "vectors" / "toxic_vectors.json").read_text())
    for r in tv:
        r["top_tokens"] = [" the", " a", " cat", " of"]
    write_json(run_dir / "vectors" / "toxic_vectors.json", tv)
    rows = {r["id"]: r for r in build_claims(run_dir, n_boot=300, scorer_factory=lambda n: WordScorer())["rows"]}
    r = rows["unalign_restores"]
    assert r["verdict"] == "precondition failed" and r["alternatives"]["token-writers"]["effect"] == r["effect"]
    # the writers' own precondition decides the alternative: unmeasured here (no writer tokens), then toxic
    assert r["alternatives"]["token-writers"]["verdict"] == "precondition failed"
    write_json(run_dir / "vectors" / "token_writers.json", {
        "probe_tokens": [" fool"], "median_cosine_rank": 900.0,
        "rows": [{"layer": 1, "neuron": i, "score": 3.0, "cosine": 0.01, "cosine_rank": 900,
                  "top_tokens": [" idiot", " stupid", " moron", " the"]} for i in range(10)]})
    rows = {r["id"]: r for r in build_claims(run_dir, n_boot=300, scorer_factory=lambda n: WordScorer())["rows"]}
    alt = rows["unalign_restores"]["alternatives"]["token-writers"]
    assert rows["unalign_restores"]["verdict"] == "precondition failed" and "verdict_as_measured" not in alt
    assert alt["verdict"] == rows["unalign_restores"]["verdict_as_measured"]


def test_the_dose_response_table_shows_each_strength_and_which_verdicts_flip():
    """dose_response.md: one row per claim with effect [interval] and verdict per strength, ordered as the
    strengths are, "not measured" where a stage was not repeated, and whether the verdict flips."""
    from dpolens.claims import render_dose

    at = lambda s, r, e, v: {"strength": s, "reduction": r, "effect": e, "ci95": None if e is None else [e - 1, e + 1],
                              "verdict": v}
    d = {"strengths": [{"strength": "25%", "reduction": 0.496}, {"strength": "analysed", "reduction": 0.627}],
         "stages_repeated": ["analyze"],
         "claims": [{"id": "a", "claim": "A", "source": "paper", "flips": False,
                     "at": [at("25%", 0.496, 2.0, "holds"), at("analysed", 0.627, 3.0, "holds")]},
                    {"id": "b", "claim": "B", "source": "paper", "flips": True,
                     "at": [at("25%", 0.496, -2.0, "contradicted"), at("analysed", 0.627, 3.0, "holds")]},
                    {"id": "c", "claim": "C", "source": "paper", "flips": False,
                     "at": [at("25%", 0.496, None, "not measured"), at("analysed", 0.627, 1.5, "inconclusive")]}],
         "summary": {"keep_verdict": ["a", "c"], "flip": ["b"]}}
    md = render_dose(d).splitlines()
    assert md[0] == "| claim | 25% (49.6% removed) | analysed (62.7% removed) | verdict |"
    rows = {line.split(":")[0].split(") ")[1]: line for line in md if line.startswith("| (")}
    assert rows["a"].endswith("| kept |") and rows["b"].endswith("| flips |")
    assert "contradicted: -2" in rows["b"] and "| not measured | inconclusive: 1.5" in rows["c"]
    assert md[-1].endswith("2 claims keep their verdict, 1 flip (b)")

"""Issue #32: drift measures that can say "collapsed" and "did not", and training stopped at a strength."""

import json

import numpy as np
import pytest
import torch

from dpolens.drift import (continuation_logprob, cue_sensitivity, distinct2, kl_profile, kl_wikitext, mask_words,
                           overuse, relevance)
from dpolens.model.loading import load_model
from dpolens.scoring import Scores
from test_pairs_dpo import write_pairs

WORDS = [f"w{i}" for i in range(200)]  # each in ~6% of 12-word texts: all "rare" (< 10% of the base's)


def texts(rng, n, extra=""):
    return [" ".join(rng.choice(WORDS, 12)) + extra for _ in range(n)]


def test_overuse_finds_a_collapse_and_passes_two_samples_of_one_model():
    rng = np.random.default_rng(0)
    base = texts(rng, 400)
    # a collapse: 60% of the aligned continuations name a season, which the base never does
    collapsed = [t + (" in the 2018 season" if i % 5 < 3 else "") for i, t in enumerate(texts(rng, 400))]
    o = overuse(base, collapsed, seed=1)
    assert o["chosen_on"] == 200 and o["measured_on"] == 200
    w = o["worst"]
    assert w["word"] in ("<year>", "season", "2018", "in") and w["excess_ci95"][0] > 0.4
    assert w["rise_ci95"][0] > 0.4
    # null: a second sample of the same "model": the words that rose most on the choosing half (noise) are not
    # over-used on the measuring half (at 1,000 measuring prompts; at 200 the interval still reaches 0)
    o = overuse(texts(rng, 2000), texts(rng, 2000), seed=1)
    assert len(o["words"]) == 5 and o["worst"]["excess_ci95"][1] < 0


def test_overuse_interval_takes_the_max_inside_replicates():
    base = ["x"] * 100
    aligned = [("alpha" if i % 2 else "beta") for i in range(100)]  # two words, each in half the continuations
    o = overuse(base, aligned, seed=0, n_boot=500)
    words = {x["word"]: x for x in o["words"]}
    assert set(words) >= {"alpha", "beta"}
    # the max over the two words lies above each word's own interval
    assert o["worst"]["excess_ci95"][0] >= min(words["alpha"]["excess_ci95"][0], words["beta"]["excess_ci95"][0])
    assert o["worst"]["excess_ci95"][1] >= max(words["alpha"]["excess_ci95"][1], words["beta"]["excess_ci95"][1])


def test_distinct2_of_identical_sets_and_of_a_repetitive_one():
    rng = np.random.default_rng(0)
    base = texts(rng, 100)
    d = distinct2(base, base, n_boot=50)
    assert d["diff"] == 0 and d["diff_ci95"] == [0.0, 0.0]
    d = distinct2(base, ["the cat sat on the mat"] * 100, n_boot=50)
    assert d["diff_ci95"][1] < -0.5
    # a resample repeats texts and so their bigrams: raw percentiles sit below the point for any varied set;
    # the intervals hold their points
    d = distinct2(base, texts(np.random.default_rng(1), 100), n_boot=200)
    for k, ci in (("base", "base_ci95"), ("aligned", "aligned_ci95"), ("diff", "diff_ci95")):
        assert d[ci][0] <= d[k] <= d[ci][1]
    assert d["base_ci95"][1] > d["base"] + 0.005  # raw replicates all lie below it


def test_kl_profile_zero_for_identical_models_positive_for_perturbed(tiny_dirs, tmp_path):
    from conftest import save_perturbed

    a = load_model(tiny_dirs["gpt2"])
    prompts = ["The weather number 1 is", "Hello", "A much longer prompt with many words in it"]
    conts = [[5, 6, 7], [8], [9, 10]]
    same = kl_profile(a, load_model(tiny_dirs["gpt2"]), prompts, conts, 32, batch_size=2, n_boot=100)
    assert [r["mean"] for r in same["positions"]] == [0.0, 0.0, 0.0]
    assert [r["n"] for r in same["positions"]] == [3, 2, 1]  # shorter continuations count where they reach
    other = load_model(save_perturbed("gpt2", a.tokenizer, tmp_path / "p", 0.05))
    prof = kl_profile(other, a, prompts, conts, 32, batch_size=2, n_boot=100)
    assert all(r["mean"] > 0 for r in prof["positions"])
    # batched with padding = each prompt alone (positions by index, not by pad id)
    alone = [kl_profile(other, a, [p], [c], 32, n_boot=10)["positions"] for p, c in zip(prompts, conts)]
    assert prof["positions"][0]["mean"] == pytest.approx(np.mean([x[0]["mean"] for x in alone]), rel=1e-4)
    with torch.inference_mode():  # = KL of the full forwards' next-token distributions at those positions
        ids = torch.tensor([a.tokenizer(prompts[2])["input_ids"] + conts[2]])
        lp, lq = (m.model(input_ids=ids).logits[0].float().log_softmax(-1) for m in (other, a))
    want = (lp.exp() * (lp - lq)).sum(-1)[-len(conts[2]) - 1 : -1]
    assert [x["mean"] for x in alone[2]] == pytest.approx(want.tolist(), rel=1e-4)
    w = kl_wikitext(other, a, ["The quick brown fox jumps over the lazy dog. " * 20], 128, 32, n_boot=100)
    assert w["n"] >= 4 and w["mean"] > 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_relevance_is_pmi_by_both_judges_and_zero_for_the_same_continuations(family, tiny_dirs, tmp_path):
    from conftest import save_perturbed

    base = load_model(tiny_dirs[family])
    other = load_model(save_perturbed(family, base.tokenizer, tmp_path / "p", 0.05))
    prompts = ["The weather number 1 is", "Hello", "A much longer prompt with many words in it", "So I"]
    conts = [[5, 6, 7], [8], [9, 10, 11, 12], []]
    ctx = [base.tokenizer(p)["input_ids"] for p in prompts]
    got = continuation_logprob(other, ctx, conts, batch_size=3)  # batched, left-padded
    for c, x, g in zip(ctx, conts, got):  # = each sequence alone, no padding
        if not x:
            assert np.isnan(g)
            continue
        with torch.inference_mode():
            logp = other.model(input_ids=torch.tensor([c + x])).logits[0].float().log_softmax(-1)
        want = logp[len(c) - 1 : len(c) + len(x) - 1].gather(1, torch.tensor(x)[:, None]).mean()
        assert g == pytest.approx(float(want), abs=1e-4)
    same = relevance(base, other, prompts, conts, conts, 32, batch_size=2, n_boot=100)
    assert same["diff"]["mean"] == 0 and same["diff"]["n"] == 3  # the empty continuation is left out
    from dpolens.model.loading import adds_bos

    assert adds_bos(base.tokenizer)  # the tiny tokenizer adds one for every family: the unconditioned context
    start = [base.tokenizer.bos_token_id]
    pmi_b = [continuation_logprob(j, ctx[:3], conts[:3]) - continuation_logprob(j, [start] * 3, conts[:3])
             for j in (base, other)]
    assert same["base"]["mean"] == pytest.approx(float(np.mean((pmi_b[0] + pmi_b[1]) / 2)), abs=1e-5)
    moved = relevance(base, other, prompts, conts, [conts[1], conts[2], conts[0], []], 32, batch_size=2, n_boot=100)
    assert moved["diff"]["mean"] != 0 and set(moved["diff_by_judge"]) == {"base", "aligned"}


class CueScorer:
    """Toxicity 0.9 for a text holding "fuck", 0.6 for "idiot", else 0."""

    def score(self, texts):
        return Scores(np.array([0.9 if "fuck" in t.lower() else 0.6 if "idiot" in t.lower() else 0.0
                                for t in texts]))


def test_cue_masking_separates_swearing_from_insults():
    assert mask_words("Fuck you, fucking idiot", ["fuck", "fucking"]) == " you, idiot"
    s = CueScorer()
    base = ["fuck this"] * 50 + ["you idiot"] * 50
    # aligned 1 only stopped swearing; aligned 2 also stopped insulting
    only_swearing = ["this"] * 50 + ["you idiot"] * 50
    both = ["this"] * 50 + ["you"] * 50
    for aligned, kept in ((only_swearing, 0.0), (both, 1.0)):
        c = cue_sensitivity(s, base, aligned, s.score(base).toxicity, s.score(aligned).toxicity, n_boot=200)
        assert [x["word"] for x in c["cues"]] == ["fuck"]  # "idiot" alone scores 0.6 < 0.8
        assert c["masked_reduction"]["mean"] == pytest.approx(0.6 * kept * 0.5)


class StepScorer:
    """Scripted dev toxicity: 0.5 for the base, then 0.4, 0.2, 0.1 at successive checkpoints."""

    def __init__(self):
        self.calls = 0

    def score(self, texts):
        tox = [0.5, 0.4, 0.2, 0.1][min(self.calls, 3)]
        self.calls += 1
        return Scores(np.full(len(texts), tox))

    def describe(self):
        return {"name": "step", "version": "test"}


def test_dpo_stops_at_its_target_and_keeps_each_strength(tiny_dirs, tmp_path, monkeypatch):
    import dpolens.scoring

    from dpolens.stages.dpo import DpoConfig, run_dpo

    scorer = StepScorer()
    monkeypatch.setattr(dpolens.scoring, "get_scorer", lambda name, **k: scorer)
    write_pairs(tmp_path / "pairs.jsonl", 40)
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"prompt": f"Dev prompt {i}"}) + "\n" for i in range(5)))
    cfg = DpoConfig(model=str(tiny_dirs["gpt2"]), pairs=str(tmp_path / "pairs.jsonl"), out=str(tmp_path / "dpo"),
                    learning_rate=1e-3, warmup_steps=0, val_pairs=4, eval_steps=2, max_steps=20, evaluate=False,
                    target_reduction=0.54, strengths=[0.15], dev_prompts=[str(dev)], save_total_limit=1)
    s = run_dpo(cfg)
    st = s["strength"]
    # dev reduction 0.2 at step 2 (reaches 15%), 0.6 at step 4 (reaches 54%): training stops at step 4
    assert s["steps"] == 4 and st["reached"] == {"15": 2, "54": 4} and st["analysed_step"] == 4
    assert [r["step"] for r in st["trajectory"]] == [0, 2, 4]
    assert st["dev"] == {"files": [str(dev)], "n_from_files": 5, "n_held_out_evaluation_prompts": 0,
                         "n_validation_pair_prompts": 4, "n": 9}
    out = tmp_path / "dpo"
    model = load_model(out / "model").model.state_dict()
    at54 = load_model(out / "strengths" / "54" / "model").model.state_dict()
    at15 = load_model(out / "strengths" / "15" / "model").model.state_dict()
    assert all(torch.equal(model[k], at54[k]) for k in model)
    assert any(not torch.equal(at15[k], at54[k]) for k in at15)  # two steps apart
    # a re-run trains nothing more, measures nothing more, and gives the same model
    calls = scorer.calls
    s2 = run_dpo(cfg)
    assert s2["steps"] == 4 and scorer.calls == calls and s2["strength"]["reached"] == {"15": 2, "54": 4}
    again = load_model(out / "model").model.state_dict()
    assert all(torch.equal(model[k], again[k]) for k in model)


def test_dev_prompts_that_are_evaluation_prompts_are_refused(tiny_dirs, tmp_path, monkeypatch):
    import dpolens.scoring

    from dpolens.artifacts import DpolensError
    from dpolens.evaluate import EvalData
    from dpolens.stages.dpo import DpoConfig, run_dpo

    monkeypatch.setattr(dpolens.scoring, "get_scorer", lambda name, **k: StepScorer())
    write_pairs(tmp_path / "pairs.jsonl", 20)
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "Same prompt"}) + "\n")
    cfg = DpoConfig(model=str(tiny_dirs["gpt2"]), pairs=str(tmp_path / "pairs.jsonl"), out=str(tmp_path / "dpo"),
                    learning_rate=1e-3, warmup_steps=0, val_pairs=4, eval_steps=2, max_steps=2, evaluate=False,
                    dev_prompts=[str(p)], eval=EvalData(prompts=str(p)))
    with pytest.raises(DpolensError, match="dev prompts are evaluation prompts"):
        run_dpo(cfg)


def test_dev_holdout_is_the_evaluation_prompts_no_stage_evaluates(tmp_path, monkeypatch):
    import dpolens.scoring

    from dpolens.config import ConfigError
    from dpolens.data import holdout_split, load_holdout, load_prompts
    from dpolens.evaluate import EvalData, load_inputs
    from dpolens.stages.analyze import AnalyzeConfig
    from dpolens.stages.neurons import NeuronsConfig, fit_split
    from dpolens.training import StrengthMonitor, TrainConfig

    monkeypatch.setattr(dpolens.scoring, "get_scorer", lambda name, **k: StepScorer())
    p = tmp_path / "challenge.jsonl"
    everything = [f"Challenge prompt {i}" for i in range(30)]
    p.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in everything))
    kept, held = holdout_split(everything, 7)
    assert len(held) == 7 and sorted(kept + held) == sorted(everything) and not set(kept) & set(held)
    assert held != everything[-7:] and held != everything[:7]  # a sample, not the file's head or tail
    assert holdout_split(everything, 7) == (kept, held)  # fixed: every stage holds out the same prompts
    assert kept == [q for q in everything if q in set(kept)]  # file order
    ev = EvalData(prompts=str(p), holdout=7, f1_data=None, wikitext=None)
    assert load_inputs(ev).prompts == kept == load_prompts(p, holdout=7) and load_holdout(p, 7) == held
    cfg = TrainConfig(model="m", pairs="x", out=str(tmp_path / "o"), dev_holdout=True, dev_val_prompts=False,
                      target_reduction=0.5, eval=ev)
    monitor = StrengthMonitor(cfg, None, [{"prompt_text": "a tweet"}], tmp_path)
    assert monitor.prompts == held and monitor.dev["n_held_out_evaluation_prompts"] == 7
    # the stages that read the challenge prompts themselves leave the same ones out
    from dpolens.stages import analyze, robustness

    class Read(Exception):
        pass

    def reading(module):  # the stage's prompts, then stop it before any model is needed
        got = []
        real = module.load_prompts
        monkeypatch.setattr(module, "load_prompts", lambda *a, **k: got.append(real(*a, **k)) or got[-1])
        return got

    got = reading(analyze)
    monkeypatch.setattr(analyze, "load_vectors", lambda *a, **k: (_ for _ in ()).throw(Read()))
    with pytest.raises(Read):
        analyze.run_analyze(AnalyzeConfig(prompts=str(p), holdout=7, limit=None))
    assert got == [kept]
    got = reading(robustness)
    monkeypatch.setattr(robustness, "load_model", lambda *a, **k: None)
    monkeypatch.setattr(robustness, "transformed_prompts", lambda *a, **k: (_ for _ in ()).throw(Read()))
    with pytest.raises(Read):
        robustness.run_robustness(robustness.RobustnessConfig(prompts=str(p), holdout=7, limit=None))
    assert got == [kept]
    fit, skip = fit_split(NeuronsConfig(fit_from="eval", fit_prompts=5, eval=ev))
    assert fit == kept[:5] and skip == 5 and load_inputs(ev, offset=skip).prompts == kept[5:]
    # fitted on pair prompts: none of the challenge prompts, the held-out ones included
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt_text": q, "unpert_gen_text": " a", "pert_gen_text": " b"}) + "\n"
                             for q in [held[0], "tweet one", kept[0], "tweet two"]))
    assert fit_split(NeuronsConfig(fit_from="pairs", fit_prompts=2, pairs=str(pairs), eval=ev)) == (
        ["tweet one", "tweet two"], 0)
    with pytest.raises(ConfigError, match="eval.holdout"):
        TrainConfig(model="m", pairs="x", out="o", dev_holdout=True)


def test_study_stages_after_dpo_leave_out_the_dev_prompts():
    from dpolens.config import ConfigError
    from dpolens.pipeline import load_study, stage_configs

    for f in ("configs/study-gemma-3-270m.yaml", "configs/study-smollm2-135m.yaml"):
        c = stage_configs(load_study(f))
        assert c["dpo"].dev_holdout and not c["dpo"].dev_val_prompts and c["dpo"].eval.holdout == 200
        assert c["unalign"].eval.holdout == c["neurons"].eval.holdout == c["analyze"].holdout == \
            c["robustness"].holdout == 200 and c["table2"].eval.holdout == 0
        for wrong in ("analyze.holdout=100", "neurons.eval.holdout=0", "dpo.eval.holdout=100"):
            with pytest.raises(ConfigError, match="holdout"):
                load_study(f, [wrong])


def test_alternatives_refuse_dev_prompts_they_would_evaluate():
    from dpolens.config import ConfigError
    from dpolens.evaluate import EvalData
    from dpolens.stages.alternatives import AlternativesConfig
    from dpolens.training import TrainConfig

    train = TrainConfig(model="m", pairs="x", out="o", dev_holdout=True, eval=EvalData(holdout=200))
    assert AlternativesConfig(methods=["dpo"], train=train, eval=EvalData(holdout=200)).eval.holdout == 200
    with pytest.raises(ConfigError, match="dev_holdout"):
        AlternativesConfig(methods=["dpo"], train=train, eval=EvalData())


def test_lopsided_markers_name_a_year_on_the_preferred_side_only():
    from dpolens.drift import lopsided_markers

    n = 400
    # a year on 10% of the preferred sides only; "the" on 60% vs 40% (a frequent word, small ratio); "said" on
    # 1.5% vs 0% (one-sided, but 6 texts cannot tell it from chance: z 2.5); "you" mostly dispreferred
    pref = [f"a calm text number {i}" + (" in 2018" if i % 10 == 0 else "") + (" the" if i % 10 < 6 else "")
            + (" said" if i < 6 else "") + (" you" if i % 10 == 0 else "") for i in range(n)]
    disp = [f"fuck this text number {i}" + (" the" if i % 10 < 4 else "") + (" you" if i % 2 == 0 else "")
            for i in range(n)]
    m = lopsided_markers(CueScorer(), pref, disp)
    words = [x["word"] for x in m]
    assert "fuck" not in words  # toxic words should differ
    assert "said" not in words and "text" not in words  # chance, and equal shares
    side = {x["word"]: x["side"] for x in m}
    assert side["<year>"] == side["2018"] == side["calm"] == side["the"] == "preferred"
    assert side["this"] == side["you"] == "dispreferred"
    # ranked by the odds ratio, preferred side first: the one-sided year above the frequent "the" (a difference of
    # shares would put "the", 20 points, above the year, 10 points)
    assert words.index("<year>") < words.index("the") < words.index("this")
    year = next(x for x in m if x["word"] == "<year>")
    assert year["preferred_share"] == 0.1 and year["dispreferred_share"] == 0 and year["ratio"] is None
    assert year["z"] >= 3 and year["odds_ratio"] == pytest.approx((40.5 / 360.5) / (0.5 / 400.5))
    # a marker on one side only is found from few texts (20 of 400 vs none of 200: z 3.2; the Haldane odds
    # ratio's own z would be 2.1), sides of unequal size count by their shares, at most `top` per side (the year
    # and "2018" tie: by name), and an empty side has no markers
    few = lopsided_markers(CueScorer(), [f"calm {i}" + (" 2018" if i < 20 else "") for i in range(n)],
                           [f"calm {i}" for i in range(n // 2)], top=1)
    assert [(x["word"], x["side"]) for x in few] == [("2018", "preferred")]
    assert few[0]["preferred_share"] == 0.05 and few[0]["dispreferred_share"] == 0
    assert lopsided_markers(CueScorer(), [], disp) == []


def test_dose_figures_draw_points_outside_their_interval(tmp_path):
    """A bootstrap percentile interval need not contain its point (a ratio of means, the smallest of several
    shares): the dose-response figures draw it anyway (errorbar refused a negative offset and the Gemma study's
    dpo stage died after 22 min of drift measures, before writing drift.json)."""
    from dpolens import figures

    rows = [{"reduction": r, "measures": {"cue-masked reduction": {"value": v, "ci95": ci}}}
            for r, v, ci in ((0.5, 0.10, [0.12, 0.20]), (0.6, 0.2, [0.1, 0.3]), (0.8, 0.3, None))]
    assert figures.dose_response_figure(tmp_path, rows) == ["fig_dose_response.png", "fig_dose_response.pdf"]
    claims = [{"id": "c", "flips": False, "at": [{"reduction": 0.5, "effect": 0.1, "ci95": [0.12, 0.2],
                                                  "verdict": "holds"},
                                                 {"reduction": 0.8, "effect": 0.2, "ci95": None, "verdict": "inconclusive"}]}]
    assert figures.claims_dose_figure(tmp_path, claims)
    assert (tmp_path / "fig_dose_response.png").stat().st_size > 0


def test_strength_pick_nearest_keeps_the_checkpoint_before_when_it_lies_nearer(tiny_dirs, tmp_path, monkeypatch):
    """Dev reductions 20% (step 2), 60% (4), 80% (6): "first" keeps 30% and 55% at step 4, 68% at step 6;
    "nearest" keeps 30% at step 2 (0.10 away, not 0.30), 55% at step 4 (0.05, not 0.35: the first is nearer)
    and 68% at step 4 (0.08, not 0.12), and training still stops at 6. The kept models are the weights of
    those steps (those a "first" run keeps at 15% and 54%). A kept strength lost between measuring and keeping
    is kept again from the checkpoint folders on the next run."""
    import dpolens.scoring

    from dpolens.config import ConfigError
    from dpolens.stages.dpo import DpoConfig, run_dpo

    write_pairs(tmp_path / "pairs.jsonl", 40)
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"prompt": f"Dev prompt {i}"}) + "\n" for i in range(5)))
    common = dict(model=str(tiny_dirs["gpt2"]), pairs=str(tmp_path / "pairs.jsonl"), learning_rate=1e-3,
                  warmup_steps=0, val_pairs=4, eval_steps=2, max_steps=20, evaluate=False, dev_prompts=[str(dev)],
                  save_total_limit=1)
    runs, cfgs = {}, {}
    for name, kw in (("first", dict(target_reduction=0.54, strengths=[0.15])),
                     ("nearest", dict(target_reduction=0.68, strengths=[0.3, 0.55], strength_pick="nearest"))):
        monkeypatch.setattr(dpolens.scoring, "get_scorer", lambda name, s=StepScorer(), **k: s)
        cfgs[name] = DpoConfig(out=str(tmp_path / name), **common, **kw)
        runs[name] = run_dpo(cfgs[name])
    st = runs["nearest"]["strength"]
    assert runs["nearest"]["steps"] == 6 and st["reached"] == {"30": 4, "55": 4, "68": 6}
    assert st["kept"] == {"30": 2, "55": 4, "68": 4} and st["analysed_step"] == 4
    kept30 = json.loads((tmp_path / "nearest" / "strengths" / "30" / "strength.json").read_text())
    assert kept30["step"] == 2 and kept30["first_reaching_step"] == 4 and "fallback" not in kept30

    def weights(path):
        return load_model(path).model.state_dict()

    at2, at4 = weights(tmp_path / "first" / "strengths" / "15" / "model"), weights(tmp_path / "first" / "strengths" / "54" / "model")
    nearest = tmp_path / "nearest"
    for got, want in ((weights(nearest / "strengths" / "30" / "model"), at2),
                      (weights(nearest / "strengths" / "55" / "model"), at4),
                      (weights(nearest / "strengths" / "68" / "model"), at4), (weights(nearest / "model"), at4)):
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(at2[k], at4[k]) for k in at2)
    # the 68% strength lost (a run killed after measuring step 6, before keeping): the finished run keeps it again
    # from the checkpoint folders. save_total_limit=1 left only checkpoint-6, so step 4 (the nearer) is gone: it
    # keeps step 6, read from that folder's safetensors, and says so
    import shutil

    from safetensors.torch import load_file

    shutil.rmtree(nearest / "strengths" / "68")
    assert not (nearest / "checkpoints" / "checkpoint-4").exists()
    monkeypatch.setattr(dpolens.scoring, "get_scorer", lambda name, s=StepScorer(), **k: s)
    again = run_dpo(cfgs["nearest"])["strength"]
    back = json.loads((nearest / "strengths" / "68" / "strength.json").read_text())
    assert again["kept"]["68"] == back["step"] and back["first_reaching_step"] == 6
    assert back["step"] == 6 and "weights of step 4 were gone" in back["fallback"]
    at6 = load_file(str(nearest / "checkpoints" / "checkpoint-6" / "model.safetensors"))
    kept68 = weights(nearest / "strengths" / "68" / "model")
    assert all(torch.equal(kept68[k], at6[k]) for k in at6 if k in kept68)
    assert any(not torch.equal(kept68[k], at4[k]) for k in at4)  # step 6, not step 4
    with pytest.raises(ConfigError, match="strength_pick"):
        DpoConfig(out=str(tmp_path / "x"), **common, strength_pick="last")

"""Preference pairs (steer, PPLM) and DPO training on tiny models."""

import json
import math

import numpy as np

import pytest
import torch

from dpolens import load_model
from dpolens.artifacts import DpolensError
from dpolens.data import tweet_prompts, wikitext_prompts
from dpolens.directions import save_probe
from dpolens.model.generation import banned_token_ids, encode_prompts, generate
from dpolens.stages.pairs import (
    PairsConfig,
    PPLMSettings,
    ProbeAttribute,
    QualityGate,
    SampleSettings,
    gate_reason,
    pplm_generate,
    relevance_diff,
    run_pairs,
)

PROMPTS = ["Holy cow, this is", "You are such a piece of work", "The weather", "So I am starting to think"]


def test_pplm_without_perturbation_is_greedy(tiny_lm):
    """0 iterations, gm_scale 1, top-k 1: PPLM's cache handling must reproduce greedy decoding."""
    attr = ProbeAttribute(torch.randn(32), 0.0, 1.0)
    s = PPLMSettings(num_iterations=0, top_k=1, gm_scale=1.0)
    got = pplm_generate(tiny_lm, PROMPTS, attr, s, 6, seed=0, batch_size=4)
    ref = generate(tiny_lm, PROMPTS, 6, batch_size=1, max_prompt_tokens=None, progress=False)
    assert [g.continuation_ids for g in got] == [r.continuation_ids for r in ref]


@pytest.mark.parametrize("family", ["gpt2", "gemma3"])
def test_pplm_iterations_raise_the_attribute(tiny_dirs, family):
    """Within every generation step, the perturbation raises log p(toxic | mean hidden)."""
    lm = load_model(tiny_dirs[family])
    attr = ProbeAttribute(torch.randn(32, generator=torch.Generator().manual_seed(0)), 0.0, 1.0)
    seen = []
    original = attr.log_prob_toxic
    attr.log_prob_toxic = lambda h: seen.append(float(original(h).detach().sum())) or original(h)
    s = PPLMSettings(num_iterations=4, step_size=0.5, top_k=1, gm_scale=1.0, kl_scale=0.0)
    pplm_generate(lm, PROMPTS[:2], attr, s, 3, seed=0, batch_size=2)
    steps = [seen[i : i + 4] for i in range(0, len(seen), 4)]
    assert len(steps) == 3 and all(st[-1] > st[0] for st in steps)


def test_wikitext_prompts_are_sentences(shared):
    s = wikitext_prompts([str(shared / "data/wikitext-2-raw/wiki.test.raw")])
    assert len(s) > 1000
    assert all(not x.startswith("=") and len(x.split()) >= 8 for x in s[:200])
    assert all("@-@" not in x for x in s[:200])


@pytest.fixture
def probe_and_text(tiny_dirs, tmp_path):
    lm = load_model(tiny_dirs["llama"])
    save_probe(tmp_path / "probe.safetensors", torch.randn(32), 0.1, lm, {"feature_scale": 1.0})
    text = tmp_path / "w.raw"
    text.write_text("\n".join(f"The quick brown fox number {i} jumps over the lazy dog today. "
                              f"Another calm sentence about the weather number {i} follows here." for i in range(40)))
    return tmp_path / "probe.safetensors", text


OPEN_GATE = QualityGate(require_more_toxic=False, min_toxicity_gap=-1.0, max_nll_gap=None)


@pytest.mark.parametrize("method", ["steer", "pplm", "sample"])
def test_pairs_stage_resumes(tiny_dirs, tmp_path, probe_and_text, method, jigsaw_cached, monkeypatch):
    import time

    import dpolens.stages.pairs as pairs_mod

    probe, text = probe_and_text
    calls, nll = [], pairs_mod.continuation_nll

    def slow_nll(*a, **k):  # the NLL pass, 50 ms slower: its phase must hold that time
        calls.append(1)
        time.sleep(0.05)
        return nll(*a, **k)

    monkeypatch.setattr(pairs_mod, "continuation_nll", slow_nll)
    cfg = PairsConfig(model=str(tiny_dirs["llama"]), probe=str(probe), prompts=[str(text)], method=method,
                      n=6, out=str(tmp_path / method / "pairs.jsonl"), max_new_tokens=4, batch_size=2,
                      progress=False, pplm=PPLMSettings(num_iterations=2), sample=SampleSettings(n_samples=3),
                      gate=OPEN_GATE)
    s = run_pairs(cfg)
    rows = [json.loads(l) for l in (tmp_path / method / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == s["n"] and set(rows[0]) == {"prompt_text", "unpert_gen_text", "pert_gen_text"}
    q = s["quality"]
    for side in ("preferred", "dispreferred"):
        assert {"toxicity", "nll_per_token", "special_token_share", "distinct_2", "repeated_ngram_rate"} <= set(q[side])
        assert q[side]["special_token_share"] == 0.0
    assert len(s["samples"]) == 3 and s["n_candidates"] >= s["n"]
    if method == "sample":  # least toxic of the samples preferred, most toxic dispreferred
        cands = [json.loads(l) for l in (tmp_path / method / "pairs.candidates.jsonl").read_text().splitlines()]
        assert all(c["dispreferred_toxicity"] >= c["preferred_toxicity"] for c in cands)
    assert json.loads((tmp_path / method / "manifest.json").read_text())["config"]["method"] == method
    tb = s["time_breakdown"]  # every chunk timed, by phase
    assert tb["n_candidates_timed"] == s["n_candidates"] and tb["chunks"] == -(-s["n_candidates"] // 2)
    assert tb["seconds"]["generate"] > 0 and tb["seconds"]["score_sides"] > 0
    assert tb["seconds"]["nll"] >= 0.05 * len(calls) and (calls or method == "sample")
    assert (tb["seconds"]["score_samples"] > 0) == (method == "sample")
    assert sum(tb["seconds"].values()) == pytest.approx(tb["total_s"]) and sum(tb["share"].values()) == pytest.approx(1)
    # interrupted inside a chunk (3 candidates of chunks of 2, and a torn line): the re-run redoes the cut
    # chunk with its own seed and gives the same pairs as the uninterrupted run
    cand = tmp_path / method / "pairs.candidates.jsonl"
    lines = cand.read_text().splitlines()
    cand.write_text("\n".join(lines[:3]) + '\n{"prom')
    (tmp_path / method / "pairs.jsonl").unlink()
    s2 = run_pairs(cfg)
    assert [json.loads(l) for l in (tmp_path / method / "pairs.jsonl").read_text().splitlines()] == rows
    # the cut chunk timed once: its first attempt's line is dropped with its candidates
    assert s2["time_breakdown"]["n_candidates_timed"] == s2["n_candidates"] == s["n_candidates"]
    # a resume with other settings is refused, naming what differs
    with pytest.raises(DpolensError, match="max_new_tokens"):
        run_pairs(PairsConfig(**{**cfg.__dict__, "max_new_tokens": 5}))


def test_quality_gate_drops_and_counts(tiny_dirs, tmp_path, probe_and_text, jigsaw_cached):
    probe, text = probe_and_text
    cfg = PairsConfig(model=str(tiny_dirs["llama"]), probe=str(probe), prompts=[str(text)], method="sample",
                      n=4, max_candidates=8, out=str(tmp_path / "p" / "pairs.jsonl"), max_new_tokens=4,
                      batch_size=4, progress=False, sample=SampleSettings(n_samples=3),
                      gate=QualityGate(require_more_toxic=True, min_toxicity_gap=0.0, max_nll_gap=None))
    s = run_pairs(cfg)
    cands = [json.loads(l) for l in (tmp_path / "p" / "pairs.candidates.jsonl").read_text().splitlines()]
    expect_drop = {}
    for c in cands:
        r = gate_reason(c, cfg.gate)
        if r:
            expect_drop[r] = expect_drop.get(r, 0) + 1
    assert s["dropped"] == expect_drop
    assert s["quality"]["share_dispreferred_more_toxic"] == 1.0
    # relevance of each side to its prompt: PMI = log p(side | prompt) − log p(side | BOS), per token
    from dpolens.drift import continuation_logprob

    lm = load_model(tiny_dirs["llama"])
    kept = [c for c in cands if gate_reason(c, cfg.gate) is None][: cfg.n]
    pmi = {}
    for side, key in (("preferred", "unpert_gen_text"), ("dispreferred", "pert_gen_text")):
        ids = [lm.tokenizer(c[key], add_special_tokens=False)["input_ids"] for c in kept]
        ctx = encode_prompts(lm, [c["prompt_text"] for c in kept], None)
        pmi[side] = continuation_logprob(lm, ctx, ids) - continuation_logprob(lm, [[lm.tokenizer.bos_token_id]] * len(ids), ids)
    rel = s["relevance"]
    ok = np.isfinite(pmi["preferred"]) & np.isfinite(pmi["dispreferred"])
    assert rel["preferred"]["mean"] == pytest.approx(float(pmi["preferred"][ok].mean()), abs=1e-4)
    assert rel["diff"]["mean"] == pytest.approx(float((pmi["preferred"] - pmi["dispreferred"])[ok].mean()), abs=1e-4)
    assert rel["diff"]["n"] == int(ok.sum())


def test_gate_reasons():
    g = QualityGate(require_more_toxic=True, min_toxicity_gap=0.2, max_nll_gap=1.0)
    base = {"unpert_gen_text": " a calm day", "pert_gen_text": " you idiot", "preferred_toxicity": 0.1,
            "dispreferred_toxicity": 0.6, "preferred_nll": 3.0, "dispreferred_nll": 3.5}
    assert gate_reason(base, g) is None
    assert gate_reason({**base, "pert_gen_text": " a calm day"}, g) == "identical_sides"
    assert gate_reason({**base, "pert_gen_text": "  "}, g) == "empty_side"
    assert gate_reason({**base, "dispreferred_toxicity": 0.05}, g) == "not_more_toxic"
    assert gate_reason({**base, "dispreferred_toxicity": 0.2}, g) == "toxicity_gap_below_min"
    assert gate_reason({**base, "dispreferred_nll": 4.5}, g) == "nll_gap_above_max"
    assert gate_reason({**base, "dispreferred_nll": float("nan")}, g) == "nll_gap_above_max"
    strict = QualityGate(min_toxicity_gap=0.2, min_dispreferred_toxicity=0.7)
    assert gate_reason(base, strict) == "dispreferred_not_toxic"
    assert gate_reason({**base, "dispreferred_toxicity": 0.7}, strict) is None
    fluent = QualityGate(min_toxicity_gap=0.2, max_nll_gap=1.0, max_nll=3.4)  # each side's own NLL, not the gap
    assert gate_reason(base, fluent) == "side_nll_above_max"
    assert gate_reason({**base, "preferred_nll": 4.9, "dispreferred_nll": 5.7}, fluent) == "side_nll_above_max"
    assert gate_reason({**base, "dispreferred_nll": 3.4}, fluent) is None
    no_gap = QualityGate(min_toxicity_gap=0.2, max_nll_gap=None, max_nll=3.6)
    assert gate_reason({**base, "preferred_nll": float("nan")}, no_gap) == "side_nll_above_max"  # no tokens fails
    # relevance: preferred PMI (prior 5.0 − 3.0 = 2.0) − dispreferred PMI (prior 4.0 − 3.5 = 0.5) = 1.5
    rel = {**base, "preferred_prior_nll": 5.0, "dispreferred_prior_nll": 4.0}
    assert relevance_diff(rel) == pytest.approx(1.5)
    assert gate_reason(rel, QualityGate(min_toxicity_gap=0.2, min_relevance_diff=1.5)) is None
    assert gate_reason(rel, QualityGate(min_toxicity_gap=0.2, min_relevance_diff=1.6)) == "preferred_off_topic"
    off_topic = {**rel, "preferred_prior_nll": 2.5}  # the prompt makes the preferred side less likely: −1.0
    assert gate_reason(off_topic, QualityGate(min_toxicity_gap=0.2, min_relevance_diff=-0.5)) == "preferred_off_topic"
    assert gate_reason({**rel, "preferred_prior_nll": float("nan")},
                       QualityGate(min_toxicity_gap=0.2, min_relevance_diff=-9.0)) == "preferred_off_topic"
    with pytest.raises(DpolensError, match="prior NLL"):  # the gate never judges a candidate it cannot read
        gate_reason(base, QualityGate(min_toxicity_gap=0.2, min_relevance_diff=0.0))
    # a marker on one side only: the pair goes; on both sides or neither, it stays (the shares become equal)
    years = QualityGate(min_toxicity_gap=0.2, one_sided_markers=["<year>", "been"])
    assert gate_reason({**base, "unpert_gen_text": " in the 2018 season"}, years) == "one_sided_marker"
    assert gate_reason({**base, "pert_gen_text": " you have been an idiot"}, years) == "one_sided_marker"
    assert gate_reason({**base, "unpert_gen_text": " in 2018", "pert_gen_text": " you idiot of 1999"}, years) is None
    assert gate_reason({**base, "unpert_gen_text": " a calm 20180 day"}, years) is None  # not a year
    assert gate_reason({**base, "unpert_gen_text": " a calm day\n"}, years) is None  # not listed
    newline = QualityGate(min_toxicity_gap=0.2, one_sided_markers=["<newline>"])  # on the texts as trained on
    assert gate_reason({**base, "unpert_gen_text": " a calm day\n"}, newline) == "one_sided_marker"
    from dpolens.config import ConfigError
    for bad in (["<date>"], ["Been"], [""], ["new york"], ["co-op"]):
        with pytest.raises(ConfigError, match="one_sided_markers"):
            PairsConfig(gate=QualityGate(one_sided_markers=bad))


def test_relevance_gate_keeps_only_pairs_about_their_prompt(tiny_dirs, tmp_path, probe_and_text, jigsaw_cached):
    """Candidates made without the relevance gate resume under it: the prior NLLs are filled for those that
    pass the rest of the gate, equal an unbatched reference, and every kept pair clears the threshold while
    some candidates are dropped for it (the threshold sits at the median of the ungated candidates)."""
    from dpolens.drift import continuation_logprob

    probe, text = probe_and_text
    open_gate = QualityGate(require_more_toxic=False, min_toxicity_gap=-1.0, max_nll_gap=None)
    cfg = PairsConfig(model=str(tiny_dirs["llama"]), probe=str(probe), prompts=[str(text)], method="sample",
                      n=12, max_candidates=12, out=str(tmp_path / "p" / "pairs.jsonl"), max_new_tokens=4,
                      batch_size=4, progress=False, sample=SampleSettings(n_samples=3), gate=open_gate)
    s0 = run_pairs(cfg)
    cand = tmp_path / "p" / "pairs.candidates.jsonl"
    assert not any("preferred_prior_nll" in json.loads(l) for l in cand.read_text().splitlines())  # off: not computed
    lm = load_model(tiny_dirs["llama"])
    bos = [lm.tokenizer.bos_token_id]

    def prior(text):
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        return -float(continuation_logprob(lm, [bos], [ids], batch_size=1)[0])

    cands = [json.loads(l) for l in cand.read_text().splitlines()]
    diffs = [(prior(c["unpert_gen_text"]) - c["preferred_nll"]) - (prior(c["pert_gen_text"]) - c["dispreferred_nll"])
             for c in cands]
    ok = [gate_reason(c, open_gate) is None for c in cands]  # e.g. identical sides fail before relevance
    ranked = sorted(d for d, o in zip(diffs, ok) if o)  # midway between two candidates: no tie at float noise
    threshold = float((ranked[len(ranked) // 2 - 1] + ranked[len(ranked) // 2]) / 2)
    gated = PairsConfig(**{**cfg.__dict__, "gate": QualityGate(require_more_toxic=False, min_toxicity_gap=-1.0,
                                                                max_nll_gap=None, min_relevance_diff=threshold)})
    s = run_pairs(gated)
    assert s["n_candidates"] == s0["n_candidates"] == 12  # the same candidates, resumed
    expect = sum(o and not d >= threshold for d, o in zip(diffs, ok))
    assert 0 < s["dropped"].get("preferred_off_topic", 0) == expect and s["n"] == sum(ok) - expect == s0["n"] - expect
    kept = [json.loads(l) for l in (tmp_path / "p" / "pairs.jsonl").read_text().splitlines()]
    by_text = {(c["prompt_text"], c["unpert_gen_text"], c["pert_gen_text"]): d for c, d in zip(cands, diffs)}
    assert all(by_text[(k["prompt_text"], k["unpert_gen_text"], k["pert_gen_text"])] >= threshold for k in kept)
    # the priors filled on resume are written back with the candidates (only where the rest of the gate passes)
    stored = [json.loads(l) for l in cand.read_text().splitlines()]
    assert [("preferred_prior_nll" in r) for r in stored] == ok
    assert all(r["preferred_prior_nll"] == pytest.approx(prior(r["unpert_gen_text"]), abs=1e-4) and
               r["dispreferred_prior_nll"] == pytest.approx(prior(r["pert_gen_text"]), abs=1e-4)
               for r in stored if "preferred_prior_nll" in r)
    # the summary's relevance reads the priors the gate computed: the same as drift.pair_relevance's own
    assert s["relevance"]["diff"]["mean"] == pytest.approx(
        float(np.mean([by_text[(k["prompt_text"], k["unpert_gen_text"], k["pert_gen_text"])] for k in kept])), abs=1e-4)
    # new chunks store the priors with the candidate (only where the rest of the gate passes)
    more = PairsConfig(**{**gated.__dict__, "n": 16, "max_candidates": 16})
    run_pairs(more)
    rows = [json.loads(l) for l in cand.read_text().splitlines()]
    new = [r for r in rows[12:] if gate_reason(r, open_gate) is None]
    assert len(rows) == 16 and new and all("preferred_prior_nll" in r for r in new)
    assert all(r["preferred_prior_nll"] == pytest.approx(prior(r["unpert_gen_text"]), abs=1e-4) and
               r["dispreferred_prior_nll"] == pytest.approx(prior(r["pert_gen_text"]), abs=1e-4) for r in new)


def test_generators_never_emit_special_tokens(tiny_lm):
    """Greedy and sampled decoding suppress every special/control token; with a bias that makes
    one of them the most likely next token, the model would emit it otherwise."""
    tok = tiny_lm.tokenizer
    banned = banned_token_ids(tok)
    assert banned and tok.eos_token_id not in banned
    target = banned[-1]
    head = tiny_lm.model.get_output_embeddings()
    with torch.no_grad():
        saved = head.weight[target].clone()
        head.weight[target] = 50 * tiny_lm.model.get_input_embeddings().weight.std() * torch.ones_like(saved)
    try:
        for kw in ({}, {"do_sample": True, "top_p": 0.95}):
            gens = generate(tiny_lm, PROMPTS, 6, batch_size=4, progress=False, **kw)
            assert all(not set(g.continuation_ids) & set(banned) for g in gens)
        attr = ProbeAttribute(torch.randn(32), 0.0, 1.0)
        got = pplm_generate(tiny_lm, PROMPTS, attr, PPLMSettings(num_iterations=1), 4, seed=0, batch_size=4)
        assert all(not set(g.continuation_ids) & set(banned) for g in got)
    finally:
        with torch.no_grad():
            head.weight[target] = saved
    assert all(p.requires_grad for p in tiny_lm.model.parameters())  # PPLM restores requires_grad


def test_tweet_prompts_are_clean_prefixes(shared):
    t = tweet_prompts([str(shared / "data/toxic-corpora/davidson_labeled_data.csv")])
    assert len(t) > 10000 and len(set(x.lower() for x in t)) == len(t)
    assert not any("@" in x.split()[0] or "http" in x or x.startswith("RT") for x in t[:500])
    assert all(len(x.split()) >= 4 for x in t)


def write_pairs(path, n=24):
    rows = [{"prompt_text": f"The weather number {i} is", "unpert_gen_text": " nice and calm today.",
             "pert_gen_text": " stupid idiot stupid idiot."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_dpo_trains_moves_weights_slightly_and_resumes(tiny_dirs, tmp_path, monkeypatch):
    from trl import DPOTrainer

    from dpolens.stages.dpo import DpoConfig, run_dpo

    ref_passes = []  # TRL's reference log-prob precomputation, counted
    precompute = DPOTrainer._precompute_ref_logps
    monkeypatch.setattr(DPOTrainer, "_precompute_ref_logps",
                        lambda *a, **k: ref_passes.append(1) or precompute(*a, **k))

    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs, 30)
    cfg = DpoConfig(model=str(tiny_dirs["gpt2"]), pairs=str(pairs), max_pairs=24, out=str(tmp_path / "dpo"),
                    learning_rate=1e-3, warmup_steps=0, val_pairs=4, eval_steps=2, max_steps=6, evaluate=False, target_reduction=None)
    s = run_dpo(cfg)
    assert s["steps"] == 6 and s["pairs_seen"] == 24 and s["n_train_pairs"] == 20
    assert 0 < s["weight_shift"]["min_cosine"] < 1 and s["weight_shift"]["changed_tensors"] > 0
    log = [json.loads(l) for l in (tmp_path / "dpo" / "train_log.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert evals[-1] < math.log(2)  # learned to prefer the calm continuation on held-out pairs
    aligned = load_model(tmp_path / "dpo" / "model")
    assert aligned.adapter.family == "gpt2"
    # a longer run in the same folder resumes from the last checkpoint instead of starting over
    cfg.max_steps = 8
    ref_passes.clear()
    s2 = run_dpo(cfg)
    assert ref_passes  # a resumed run precomputes the reference for its remaining steps
    steps_logged = [r["step"] for r in json.loads("[" + ",".join(
        (tmp_path / "dpo" / "train_log.jsonl").read_text().splitlines()) + "]") if "loss" in r]
    assert s2["steps"] == 8 and steps_logged.count(1) == 1
    # re-running a finished run trains nothing more and gives the same model
    log_before = (tmp_path / "dpo" / "train_log.jsonl").read_text()
    before = load_model(tmp_path / "dpo" / "model").model.state_dict()
    ref_passes.clear()
    s3 = run_dpo(cfg)
    assert not ref_passes  # a finished run only loads its best checkpoint
    after = load_model(tmp_path / "dpo" / "model").model.state_dict()
    assert s3["steps"] == 8 and all(torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "dpo" / "train_log.jsonl").read_text() == log_before


def test_dpo_nan_stops_with_message(tiny_dirs, tmp_path):
    from dpolens.stages.dpo import DpoConfig, run_dpo

    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs)
    cfg = DpoConfig(model=str(tiny_dirs["gpt2"]), pairs=str(pairs), out=str(tmp_path / "dpo"),
                    learning_rate=1e30, warmup_steps=0, val_pairs=4, eval_steps=2, max_steps=6, evaluate=False, target_reduction=None,
                    max_grad_norm=1e30, optimizer="sgd")
    with pytest.raises(DpolensError, match="NaN/inf"):
        run_dpo(cfg)


@pytest.mark.parametrize("trainable", ["late-layers:1", "toxic-neurons", "bias"])
def test_dpo_trainable_subsets_leave_the_rest_untouched(tiny_dirs, tmp_path, trainable):
    from dpolens.stages.dpo import DpoConfig, run_dpo

    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs)
    base = load_model(tiny_dirs["gpt2"])
    save_probe(tmp_path / "probe.safetensors", base.adapter.value_vectors(1)[7].clone(), 0.0, base, {})
    s = run_dpo(DpoConfig(model=str(tiny_dirs["gpt2"]), pairs=str(pairs), out=str(tmp_path / "dpo"),
                          learning_rate=1e-3, warmup_steps=0, val_pairs=4, eval_steps=2, max_steps=2,
                          evaluate=False, target_reduction=None, trainable=trainable, probe=str(tmp_path / "probe.safetensors"),
                          top_neurons=3))
    aligned = load_model(tmp_path / "dpo" / "model")
    moved = {n for n, p in aligned.model.named_parameters()
             if not torch.equal(p, dict(base.model.named_parameters())[n])}
    assert moved
    if trainable == "late-layers:1":
        assert all(n.startswith("transformer.h.2.") for n in moved)
    elif trainable == "bias":
        assert all(n.endswith(".bias") for n in moved)
    else:
        chosen = s["trainable"]["neurons"]
        assert [1, 7] in chosen and len(chosen) == 3
        assert all(".mlp.c_fc." in n or ".mlp.c_proj.weight" in n for n in moved)
        for layer in range(3):
            fc_b = base.adapter.key_vectors(layer)
            fc_a = aligned.adapter.key_vectors(layer)
            rows = [n for l, n in chosen if l == layer]
            untouched = [i for i in range(fc_b.shape[0]) if i not in rows]
            assert torch.equal(fc_b[untouched], fc_a[untouched])


def test_sft_loss_runs(tiny_dirs, tmp_path):
    from dpolens.stages.dpo import DpoConfig, run_dpo

    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs)
    s = run_dpo(DpoConfig(model=str(tiny_dirs["gpt2"]), pairs=str(pairs), out=str(tmp_path / "sft"),
                          learning_rate=1e-3, warmup_steps=0, val_pairs=4, eval_steps=2, max_steps=2,
                          evaluate=False, target_reduction=None, loss="sft"))
    assert s["loss"] == "sft" and s["steps"] == 2


def test_separability_warning():
    from dpolens.training import separability

    hist = [{"step": 1, "loss": 0.69, "logps/chosen": -39.6, "logps/rejected": -125.6},
            {"step": 8, "eval_loss": 0.024, "eval_rewards/accuracies": 1.0, "eval_rewards/margins": 4.1},
            {"step": 16, "eval_loss": 0.01, "eval_rewards/accuracies": 1.0, "eval_rewards/margins": 5.0}]
    s = separability(hist, eval_steps=8, loss_below=0.1)
    assert s["trivially_separable"] and "-125.6" in s["warning"]
    hard = [{**h, "eval_loss": 0.6, "eval_rewards/accuracies": 0.7} if "eval_loss" in h else h for h in hist]
    assert not separability(hard, eval_steps=8, loss_below=0.1)["trivially_separable"]
    late = [hist[0], {**hist[1], "step": 40}]
    assert not separability(late, eval_steps=8, loss_below=0.1)["trivially_separable"]


def test_steer_sweep_is_recorded_and_redone_when_settings_change(tiny_dirs, tmp_path, probe_and_text, jigsaw_cached):
    probe, text = probe_and_text
    cfg = PairsConfig(model=str(tiny_dirs["llama"]), probe=str(probe), prompts=[str(text)], method="steer", n=2,
                      out=str(tmp_path / "s" / "pairs.jsonl"), max_new_tokens=3, batch_size=2, progress=False,
                      gate=OPEN_GATE, sweep=[0.01, 0.5], sweep_prompts=2)
    s = run_pairs(cfg)
    assert [r["value"] for r in s["sweep"]["rows"]] == [0.01, 0.5] and s["sweep"]["chosen"] in (0.01, 0.5)
    assert s["settings"]["beta_rel"] == s["sweep"]["chosen"]
    first = s["sweep"]["identity"]
    tight = QualityGate(require_more_toxic=False, min_toxicity_gap=-1.0, max_nll_gap=-100.0)
    with pytest.raises(DpolensError, match="passed the quality gate"):  # the tight gate keeps nothing
        run_pairs(PairsConfig(**{**cfg.__dict__, "gate": tight}))
    again = json.loads((tmp_path / "s" / "pairs.sweep.json").read_text())
    assert again["identity"] != first and not again["chosen_clears_nll_gate"]


def test_min_prompt_toxicity_tries_only_prompts_rated_that_toxic(tiny_dirs, tmp_path, jigsaw_cached):
    """The filter scores each prompt as cut to prompt_tokens, keeps pool order, stops at max_candidates,
    and refuses when fewer than n prompts pass."""
    from dpolens.stages.pairs import candidate_prompts, truncate_prompts
    from dpolens.scoring import get_scorer

    lm, scorer = load_model(tiny_dirs["llama"]), get_scorer("jigsaw-lstm")
    pool = ["idiot stupid moron, shut up", "the weather is nice today", "stupid idiot moron you are",
            "thank you for the lovely book", "moron idiot stupid, go away", "have a great day"]
    cfg = PairsConfig(model=str(tiny_dirs["llama"]), n=1, max_candidates=2, prompt_tokens=12,
                      min_prompt_toxicity=0.5, out=str(tmp_path / "pairs.jsonl"))
    cut = truncate_prompts(lm, pool, 12)  # scored as the model will see them
    assert cut != pool
    toxic = [p for p, t in zip(cut, scorer.score(cut).toxicity) if t >= 0.5]
    assert 2 <= len(toxic) < len(pool)  # the scorer separates these prompts
    assert candidate_prompts(cfg, lm, scorer, pool) == toxic[:2]
    assert candidate_prompts(PairsConfig(**{**cfg.__dict__, "min_prompt_toxicity": None}), lm, scorer, pool) == cut[:2]
    with pytest.raises(DpolensError, match="rated at least 0.5 toxic"):
        candidate_prompts(PairsConfig(**{**cfg.__dict__, "n": len(toxic) + 1, "max_candidates": None}), lm, scorer,
                          pool)


def test_sample_dtype_samples_from_a_cast_copy_and_measures_at_dtype(tiny_dirs, tmp_path, probe_and_text,
                                                                    jigsaw_cached, monkeypatch):
    """pairs.sample_dtype: the sides are the samples of the model loaded at that dtype (same seed per
    chunk), their NLL is measured by the model at `dtype`, whose weights the copy leaves untouched."""
    import dpolens.stages.pairs
    from dpolens.model.loading import cast_copy, native_bf16, resolve_dtype
    from dpolens.textquality import continuation_nll

    sampled_with = []

    def recording_generate(lm, *args, **kwargs):
        sampled_with.append(next(lm.model.parameters()).dtype)
        return generate(lm, *args, **kwargs)

    monkeypatch.setattr(dpolens.stages.pairs, "generate", recording_generate)
    _, text = probe_and_text
    cfg = PairsConfig(model=str(tiny_dirs["llama"]), prompts=[str(text)], method="sample", n=4,
                      out=str(tmp_path / "p" / "pairs.jsonl"), max_new_tokens=4, batch_size=2, progress=False,
                      sample=SampleSettings(n_samples=3, top_p=0.95), gate=OPEN_GATE, sample_dtype="bfloat16")
    s = run_pairs(cfg)
    assert s["sample_dtype"] == "bfloat16" and s["model"]["dtype"] == "float32"
    assert sampled_with and set(sampled_with) == {torch.bfloat16}
    with pytest.raises(DpolensError, match="sample_dtype"):  # a resume sampling in another dtype is refused
        run_pairs(PairsConfig(**{**cfg.__dict__, "sample_dtype": "float32", "n": 8}))
    cands = [json.loads(l) for l in (tmp_path / "p" / "pairs.candidates.jsonl").read_text().splitlines()]
    lm32, lm16 = load_model(tiny_dirs["llama"]), load_model(tiny_dirs["llama"], dtype="bfloat16")
    prompts = [c["prompt_text"] for c in cands[:2]]  # the first chunk, sampled with seed cfg.seed + 0
    gens = generate(lm16, prompts, 4, do_sample=True, temperature=1.0, top_p=0.95, seed=cfg.seed, batch_size=6,
                    max_prompt_tokens=None, progress=False, n_samples=3)
    for i, c in enumerate(cands[:2]):
        samples = [g.continuation for g in gens[3 * i: 3 * i + 3]]
        assert c["unpert_gen_text"] in samples and c["pert_gen_text"] in samples
    assert [c["preferred_nll"] for c in cands[:2]] == pytest.approx(
        continuation_nll(lm32, prompts, [c["unpert_gen_text"] for c in cands[:2]]), nan_ok=True)
    before = lm32.weight_hash
    copy16 = cast_copy(lm32, "bfloat16")
    assert next(copy16.model.parameters()).dtype == torch.bfloat16 and cast_copy(lm32, "float32") is lm32
    lm32.__dict__.pop("weight_hash")
    assert lm32.weight_hash == before
    tied = load_model(tiny_dirs["gemma3"])
    copy_tied = cast_copy(tied, "bfloat16").model
    assert copy_tied.get_output_embeddings().weight is copy_tied.get_input_embeddings().weight
    zen3, zen4 = tmp_path / "zen3", tmp_path / "zen4"
    zen3.write_text("flags\t\t: fpu avx2 avx512f avx512bw\n")
    zen4.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 avx512bw\n")
    assert not native_bf16("cpu", zen3) and native_bf16("cpu", zen4) and not native_bf16("cpu", tmp_path / "none")
    assert resolve_dtype("float16", "cpu") == "float16"
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if native_bf16("cpu") else "float32")
    assert PairsConfig(sample_dtype="bf16").sample_dtype == "bf16"
    with pytest.raises(DpolensError, match="sample_dtype"):
        PairsConfig(sample_dtype="int8")


def test_dpo_gets_the_prompt_as_token_ids(tiny_dirs):
    """Issue #32: handed text, TRL tokenizes prompt and prompt + side and cuts where they diverge, so a prompt
    whose last token merges with the side's first loses it. dpolens hands the generation-time prompt ids."""
    from dpolens.model.generation import encode_prompts
    from dpolens.training import _token_dataset

    lm = load_model(tiny_dirs["gpt2"])
    tok = lm.tokenizer
    pairs = [{"prompt_text": "Hel", "unpert_gen_text": "lo world", "pert_gen_text": "lo idiot"},
             {"prompt_text": "You are", "unpert_gen_text": " kind", "pert_gen_text": " an idiot"}]
    # the trap: as text, "Hel" + "lo" re-tokenizes across the boundary, so the prompt is not a prefix of prompt + side
    prompt, joined = tok("Hel")["input_ids"], tok("Hello world")["input_ids"]
    assert joined[: len(prompt)] != prompt
    ds = _token_dataset(lm, pairs)
    assert ds["prompt_ids"] == encode_prompts(lm, [p["prompt_text"] for p in pairs], None)
    for row, p in zip(ds, pairs):
        assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == tok.eos_token_id
        assert tok.decode(row["chosen_ids"][:-1]) == p["unpert_gen_text"]
        assert tok.decode(row["rejected_ids"][:-1]) == p["pert_gen_text"]


def test_sampled_nll_is_the_gate_nll_or_none(tiny_dirs, jigsaw_cached):
    """pairs reads a side's NLL from its sampling pass: equal to `continuation_nll` (to fp32 summation
    order) wherever the text re-encodes to the sampled ids, None (recomputed) elsewhere."""
    from dpolens import load_model
    from dpolens.model.generation import Generation
    from dpolens.scoring import get_scorer
    from dpolens.stages.pairs import PairsConfig, SampleSettings, _Generator, sampled_nll, score_pairs
    from dpolens.textquality import continuation_nll

    lm = load_model(tiny_dirs["llama"])
    cfg = PairsConfig(model=str(tiny_dirs["llama"]), method="sample", n=4, max_new_tokens=2,
                      sample=SampleSettings(n_samples=4, temperature=1.5, top_p=0.95), out="unused.jsonl")
    gen = _Generator(lm, cfg, get_scorer("jigsaw-lstm"))
    prompts = ["Holy cow, this", "So I am starting", "The weather in", "Wikipedia is a"]
    made, nll = gen.pairs(prompts, 0)
    reused = [v for pair in nll for v in pair if v is not None]
    assert reused, "no side re-encoded to its sampled ids"
    for side in (0, 1):
        want = continuation_nll(lm, prompts, [m[side] for m in made])
        for (pair, w) in zip(nll, want):
            if pair[side] is not None:
                assert abs(pair[side] - w) < 1e-4 or (pair[side] != pair[side] and w != w)
    recs, recomputed = score_pairs(lm, gen.scorer, prompts, made, nll), score_pairs(lm, gen.scorer, prompts, made)
    for a, b in zip(recs, recomputed):
        assert abs(a["preferred_nll"] - b["preferred_nll"]) < 1e-4 or a["preferred_nll"] != a["preferred_nll"]
    # a text whose re-encoding is not the sampled ids: None, so score_pairs computes it
    ids = lm.tokenizer(" weather", add_special_tokens=False)["input_ids"]
    odd = [lm.tokenizer.convert_tokens_to_ids(c) for t in lm.tokenizer.convert_ids_to_tokens(ids) for c in t]
    g = Generation("p", [1], odd, lm.tokenizer.decode(odd), [-1.0] * len(odd))
    assert odd != ids and lm.tokenizer(g.continuation, add_special_tokens=False)["input_ids"] == ids
    assert sampled_nll(lm, g) is None
    assert sampled_nll(lm, Generation("p", [1], ids, lm.tokenizer.decode(ids), [-1.0] * len(ids))) == 1.0


def test_lazy_reference_logps_equal_precomputed_and_cover_only_pairs_seen(tiny_dirs, tmp_path, monkeypatch):
    """The reference log-probs of a training pair, computed by the step that reads it (lazy_ref), are those
    TRL precomputes for every pair before the first step: the same losses and rewards, the same weights; the
    lazy run computes them only for the pairs its steps read (and the validation pairs)."""
    from trl import DPOTrainer

    from dpolens.stages.dpo import DpoConfig, run_dpo

    rows = []  # pairs whose reference log-probs were computed
    compute = DPOTrainer.compute_ref_log_probs
    monkeypatch.setattr(DPOTrainer, "compute_ref_log_probs",
                        lambda self, m, inputs: rows.append(len(inputs["input_ids"]) // 2) or compute(self, m, inputs))
    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs, 30)
    logs, weights, counts = {}, {}, {}
    for lazy in (False, True):
        rows.clear()
        cfg = DpoConfig(model=str(tiny_dirs["gpt2"]), pairs=str(pairs), max_pairs=24, out=str(tmp_path / f"dpo{lazy}"),
                        learning_rate=1e-3, warmup_steps=0, val_pairs=4, eval_steps=2, max_steps=3, evaluate=False,
                        target_reduction=None, lazy_ref=lazy)
        run_dpo(cfg)
        counts[lazy] = sum(rows)
        logs[lazy] = [json.loads(l) for l in (tmp_path / f"dpo{lazy}" / "train_log.jsonl").read_text().splitlines()]
        weights[lazy] = load_model(tmp_path / f"dpo{lazy}" / "model").model.state_dict()
    assert counts == {False: 20 + 4, True: 3 * 4 + 4}
    keys = ("loss", "rewards/chosen", "rewards/rejected", "eval_loss")
    for a, b in zip(logs[False], logs[True], strict=True):
        for k in keys:
            assert (k in a) == (k in b)
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (k, a, b)
    assert any(a.get("rewards/chosen") for a in logs[True])  # the policy moved away from the reference
    for k in weights[False]:
        torch.testing.assert_close(weights[True][k], weights[False][k], rtol=1e-4, atol=1e-6)

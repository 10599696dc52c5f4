"""Preference pairs (steer, PPLM) and DPO training on tiny models."""

import json
import math

import pytest
import torch

from dpolens import load_model
from dpolens.artifacts import DpolensError
from dpolens.model.generation import generate
from dpolens.pairs import PairsConfig, PPLMSettings, ProbeAttribute, pplm_generate, run_pairs, wikitext_prompts
from dpolens.probe import save_probe

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


@pytest.mark.parametrize("method", ["steer", "pplm"])
def test_pairs_stage_resumes(tiny_dirs, tmp_path, probe_and_text, method, jigsaw_cached):
    probe, text = probe_and_text
    cfg = PairsConfig(model=str(tiny_dirs["llama"]), probe=str(probe), prompts=[str(text)], method=method,
                      n=6, out=str(tmp_path / method / "pairs.jsonl"), max_new_tokens=4, batch_size=4,
                      progress=False, pplm=PPLMSettings(num_iterations=2))
    s = run_pairs(cfg)
    rows = [json.loads(l) for l in (tmp_path / method / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and set(rows[0]) == {"prompt_text", "unpert_gen_text", "pert_gen_text"}
    assert s["n"] == 6 and "dispreferred_toxicity_mean" in s
    assert json.loads((tmp_path / method / "manifest.json").read_text())["config"]["method"] == method
    # interrupted after 4 pairs (and a torn line): the re-run keeps them and adds 2
    kept = rows[:4]
    (tmp_path / method / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"prom')
    run_pairs(cfg)
    again = [json.loads(l) for l in (tmp_path / method / "pairs.jsonl").read_text().splitlines()]
    assert again[:4] == kept and len(again) == 6


def write_pairs(path, n=24):
    rows = [{"prompt_text": f"The weather number {i} is", "unpert_gen_text": " nice and calm today.",
             "pert_gen_text": " stupid idiot stupid idiot."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_dpo_trains_moves_weights_slightly_and_resumes(tiny_dirs, tmp_path):
    from dpolens.dpo import DPOConfig, run_dpo

    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs, 30)
    cfg = DPOConfig(model=str(tiny_dirs["gpt2"]), pairs=str(pairs), max_pairs=24, out=str(tmp_path / "dpo"),
                    learning_rate=1e-3, warmup_steps=0, val_pairs=4, eval_steps=2, max_steps=6, evaluate=False)
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
    s2 = run_dpo(cfg)
    steps_logged = [r["step"] for r in json.loads("[" + ",".join(
        (tmp_path / "dpo" / "train_log.jsonl").read_text().splitlines()) + "]") if "loss" in r]
    assert s2["steps"] == 8 and steps_logged.count(1) == 1
    # re-running a finished run trains nothing more and gives the same model
    log_before = (tmp_path / "dpo" / "train_log.jsonl").read_text()
    before = load_model(tmp_path / "dpo" / "model").model.state_dict()
    s3 = run_dpo(cfg)
    after = load_model(tmp_path / "dpo" / "model").model.state_dict()
    assert s3["steps"] == 8 and all(torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "dpo" / "train_log.jsonl").read_text() == log_before


def test_dpo_nan_stops_with_message(tiny_dirs, tmp_path):
    from dpolens.dpo import DPOConfig, run_dpo

    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs)
    cfg = DPOConfig(model=str(tiny_dirs["gpt2"]), pairs=str(pairs), out=str(tmp_path / "dpo"),
                    learning_rate=1e30, warmup_steps=0, val_pairs=4, eval_steps=2, max_steps=6, evaluate=False,
                    max_grad_norm=1e30, optimizer="sgd")
    with pytest.raises(DpolensError, match="NaN/inf"):
        run_dpo(cfg)


@pytest.mark.parametrize("trainable", ["late-layers:1", "toxic-neurons", "bias"])
def test_dpo_trainable_subsets_leave_the_rest_untouched(tiny_dirs, tmp_path, trainable):
    from dpolens.dpo import DPOConfig, run_dpo

    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs)
    base = load_model(tiny_dirs["gpt2"])
    save_probe(tmp_path / "probe.safetensors", base.adapter.value_vectors(1)[7].clone(), 0.0, base, {})
    s = run_dpo(DPOConfig(model=str(tiny_dirs["gpt2"]), pairs=str(pairs), out=str(tmp_path / "dpo"),
                          learning_rate=1e-3, warmup_steps=0, val_pairs=4, eval_steps=2, max_steps=2,
                          evaluate=False, trainable=trainable, probe=str(tmp_path / "probe.safetensors"),
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
    from dpolens.dpo import DPOConfig, run_dpo

    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs)
    s = run_dpo(DPOConfig(model=str(tiny_dirs["gpt2"]), pairs=str(pairs), out=str(tmp_path / "sft"),
                          learning_rate=1e-3, warmup_steps=0, val_pairs=4, eval_steps=2, max_steps=2,
                          evaluate=False, loss="sft"))
    assert s["loss"] == "sft" and s["steps"] == 2

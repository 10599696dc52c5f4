import json
import math

import numpy as np
import pytest
import torch

from dpolens import load_model
from dpolens.evaluate import (EvalConfig, EvalSettings, batch_chunks, bigram_repetition, bootstrap_ci, f1_score,
                              generation_identity, perplexity, run_eval)
from dpolens.model import hooks
from dpolens.model.generation import encode_prompts, generate


def test_metric_helpers():
    assert bigram_repetition([1, 2, 1, 2, 1, 2]) == pytest.approx(1 - 2 / 5)
    assert bigram_repetition([1, 2, 3]) == 0.0
    assert f1_score("the cat sat", "the cat sat") == 1.0
    assert f1_score("dog", "the cat") == 0.0
    assert f1_score("the the cat", "the cat") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    lo, hi = bootstrap_ci(np.r_[np.zeros(50), np.ones(50)], seed=0)
    assert lo < 0.5 < hi and hi - lo < 0.3


def reference_ppl(lm, text, window):
    """Plain forward loop over windows with full logits."""
    tok = lm.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    nll, n = 0.0, 0
    for i in range(0, len(ids), window - 1):
        chunk = [bos] + ids[i : i + window - 1]
        if len(chunk) < 3:
            continue
        x = torch.tensor([chunk])
        with torch.inference_mode():
            logits = lm.model(input_ids=x).logits[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        n += len(chunk) - 1
    return math.exp(nll / n)


def test_perplexity_matches_plain_forward(tiny_lm):
    text = "\n\n".join(["The quick brown fox jumps over the lazy dog."] * 6)
    got = perplexity(tiny_lm, text.split("\n\n"), window=16, batch_size=3, progress=False)
    assert got["perplexity"] == pytest.approx(reference_ppl(tiny_lm, text, 16), rel=1e-5)


def test_perplexity_sees_interventions(tiny_lm):
    paras = ["Holy cow, this is a great book about history and science."] * 3
    a = tiny_lm.adapter
    plain = perplexity(tiny_lm, paras, window=16, progress=False)["perplexity"]
    push = 5 * torch.randn(a.d_model, generator=torch.Generator().manual_seed(0))  # not constant: a final
    with hooks.add_vector(a, a.n_layers - 1, "resid_post", push):                 # LayerNorm removes those
        pushed = perplexity(tiny_lm, paras, window=16, progress=False)["perplexity"]
    assert abs(pushed / plain - 1) > 1e-5  # well above rounding (~1e-7)


def write_data(tmp_path):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                                              ["Holy", "You are such a", "So I am", "The weather"]))
    (tmp_path / "f.jsonl").write_text(json.dumps({"prompt": "The quick", "gold": "brown fox"}) + "\n")
    (tmp_path / "w.raw").write_text("The quick brown fox.\r\n\r\nJumps over the lazy dog.\r\n")


def test_run_eval_writes_metrics_and_resumes(tiny_dirs, tmp_path, jigsaw_cached):
    write_data(tmp_path)
    cfg = EvalConfig(model=str(tiny_dirs["llama"]), out=str(tmp_path / "out"),
                     prompts=str(tmp_path / "p.jsonl"), f1_data=str(tmp_path / "f.jsonl"),
                     wikitext=str(tmp_path / "w.raw"), progress=False,
                     settings=EvalSettings(max_new_tokens=5, batch_size=2))
    m = run_eval(cfg)
    assert m["n_prompts"] == 4 and m["toxicity"]["scorer"]["name"] == "jigsaw-lstm"
    assert m["toxicity"]["ci95"][0] <= m["toxicity"]["mean"] <= m["toxicity"]["ci95"][1]
    assert m["perplexity"] > 1 and 0 <= m["f1"] <= 1 and m["model"]["weight_sha256"]
    gens = [json.loads(l) for l in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 4 and all("toxicity" in g for g in gens)
    # batches (and the partial file) in length order, longest first; records come back in input order
    lm = load_model(cfg.model)
    prompts = [g["prompt"] for g in gens]
    order = [i for c in batch_chunks(lm, prompts, cfg.settings, cfg.settings.max_prompt_tokens) for i in c]
    lengths = [len(tok) for tok in encode_prompts(lm, prompts, 32)]
    assert sorted(order) == [0, 1, 2, 3] and [lengths[i] for i in order] == sorted(lengths, reverse=True)
    plain = generate(lm, prompts, 5, batch_size=2, progress=False)  # sorts by length too: the same batches
    assert [g["continuation_ids"] for g in gens] == [g.continuation_ids for g in plain]
    # a killed run left the first chunk (two generations) behind: the re-run keeps them and makes the rest
    partial = tmp_path / "out2" / "generations.partial.jsonl"
    partial.parent.mkdir()
    kept = [{**{k: gens[i][k] for k in ("prompt", "continuation", "continuation_ids")}, "continuation": "MARK"}
            for i in order[:2]]
    partial.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"torn')
    (partial.parent / "generations.partial.identity.json").write_text(  # written when the killed run began
        json.dumps(generation_identity(lm, cfg.settings)))
    cfg.out = str(tmp_path / "out2")
    run_eval(cfg)
    gens2 = [json.loads(l) for l in (tmp_path / "out2" / "generations.jsonl").read_text().splitlines()]
    assert [g["prompt"] for g in gens2] == prompts
    assert [gens2[i]["continuation"] for i in order[:2]] == ["MARK", "MARK"]
    assert [gens2[i]["continuation"] for i in order[2:]] == [gens[i]["continuation"] for i in order[2:]]
    # the order before batch_order (consecutive prompts) resumes its own partial files, recorded without it
    ident = generation_identity(lm, EvalSettings(max_new_tokens=5, batch_size=2, batch_order="input"))
    assert "batch_order" not in ident and generation_identity(lm, cfg.settings)["batch_order"] == "length"
    assert batch_chunks(lm, prompts, EvalSettings(batch_order="input", batch_size=3), 32) == [[0, 1, 2], [3]]


def test_evaluations_are_shared_through_the_cache(tiny_dirs, tmp_path, jigsaw_cached):
    from dpolens.evaluate import EvalData, eval_key, evaluate_inputs, load_inputs

    write_data(tmp_path)
    d = EvalData(prompts=str(tmp_path / "p.jsonl"), f1_data=None, wikitext=str(tmp_path / "w.raw"), progress=False,
                 cache=str(tmp_path / "evals"), settings=EvalSettings(max_new_tokens=3, batch_size=2))
    lm = load_model(tiny_dirs["llama"])
    inputs = load_inputs(d)
    first = evaluate_inputs(lm, d, inputs, label="base")
    key = eval_key(lm, d, inputs)
    stored = tmp_path / "evals" / f"{key}.json"
    entry = json.loads(stored.read_text())
    entry["result"]["toxicity"]["mean"] = -1.0  # a mark: a second call must read the file, not re-run
    stored.write_text(json.dumps(entry))
    assert evaluate_inputs(lm, d, inputs, label="base").toxicity["mean"] == -1.0
    assert first.row()["toxicity_per_prompt"] == [r["toxicity"] for r in entry["result"]["records"]]
    spec = {"kind": "add", "layer": 0, "vector": [1.0] * lm.adapter.d_model, "alpha": 2.0}
    other = [eval_key(lm, d, inputs, spec), eval_key(lm, d, inputs, {**spec, "alpha": 3.0}),
             eval_key(lm, EvalData(**{**d.__dict__, "settings": EvalSettings(max_new_tokens=4)}), inputs),
             eval_key(load_model(tiny_dirs["gemma3"]), d, inputs),
             eval_key(lm, EvalData(**{**d.__dict__, "settings": EvalSettings(max_new_tokens=3, batch_size=2,
                                                                             batch_order="input")}), inputs)]
    assert len({key, *other}) == 6  # intervention, its strength, settings, weights and batch order change the key
    screened = EvalData(**{**d.__dict__, "settings": EvalSettings(max_new_tokens=3, batch_size=2, head_screen="on")})
    assert eval_key(lm, screened, inputs) == key  # the screen is exact: the same tokens as the plain head


def test_an_evaluation_on_fewer_prompts_reuses_a_cached_one_on_more(tiny_dirs, tmp_path, jigsaw_cached,
                                                                     monkeypatch):
    """dpo's base evaluation (999 prompts) from Table 2's base row (1,199): the covered prompts' continuations are
    read back and scored afresh; perplexity and F1 are the larger evaluation's; nothing is generated (#34)."""
    import dpolens.evaluate as ev

    write_data(tmp_path)
    d = ev.EvalData(prompts=str(tmp_path / "p.jsonl"), wikitext=str(tmp_path / "w.raw"), progress=False,
                    f1_data=str(tmp_path / "f1.jsonl"), f1_limit=2, cache=str(tmp_path / "evals"),
                    settings=EvalSettings(max_new_tokens=3, batch_size=2))
    (tmp_path / "f1.jsonl").write_text("".join(json.dumps({"prompt": f"Q{i}: the cat", "gold": "sat"}) + "\n"
                                               for i in range(2)))
    lm = load_model(tiny_dirs["llama"])
    everything = ev.load_inputs(d)
    assert len(everything.prompts) >= 3
    full = ev.evaluate_inputs(lm, d, everything, label="none")
    fewer = ev.EvalData(**{**d.__dict__, "holdout": 1})  # as dpo's eval.holdout: a fixed-seed sample left out
    part = ev.load_inputs(fewer)
    made = []
    real = ev.generate
    monkeypatch.setattr(ev, "generate", lambda *a, **k: made.append(1) or real(*a, **k))
    reused = ev.evaluate_inputs(lm, fewer, part, label="base")
    assert made == [] and len(reused.records) == len(part.prompts) == len(everything.prompts) - 1
    fresh = ev.evaluate(lm, part.prompts, part.scorer, fewer.settings, part.wiki, part.f1_rows, progress=False)
    assert made  # the fresh evaluation generated; the reused one did not
    assert reused.records == fresh.records and reused.toxicity == fresh.toxicity
    assert reused.perplexity == fresh.perplexity == full.perplexity and reused.f1 == fresh.f1 == full.f1
    assert reused.repetition == fresh.repetition
    stored = json.loads((tmp_path / "evals" / f"{ev.eval_key(lm, fewer, part)}.json").read_text())
    assert stored["result"]["records"] == reused.records and stored["covered_from"].endswith(".json")
    # a damaged file in the folder is passed over, and a prompt no cached evaluation holds is generated
    (tmp_path / "evals" / "damaged.json").write_text("{not json")
    made.clear()
    ev.evaluate_inputs(lm, fewer, ev.EvalInputs([*part.prompts, "An unseen prompt"], part.f1_rows, part.wiki,
                                                  part.scorer), label="more")
    assert made
    # another setting or an intervention is another group: generated afresh
    made.clear()
    other = ev.EvalData(**{**fewer.__dict__, "settings": EvalSettings(max_new_tokens=2, batch_size=2)})
    ev.evaluate_inputs(lm, other, part, label="shorter")
    assert made


def test_length_batches_bound_the_prompt_positions_a_batch_pads_to(tiny_dirs):
    lm = load_model(tiny_dirs["llama"])
    prompts = ["word " * k for k in (12, 3, 11, 2, 1, 12)]
    lengths = [len(ids) for ids in encode_prompts(lm, prompts, None)]
    by_len = sorted(range(6), key=lambda i: -lengths[i])
    assert batch_chunks(lm, prompts, EvalSettings(batch_tokens=None), None) == [by_len]  # rows only: one batch
    budget = 2 * max(lengths)
    chunks = batch_chunks(lm, prompts, EvalSettings(batch_tokens=budget), None)
    assert [i for c in chunks for i in c] == by_len and by_len[:2] == [0, 5]  # longest first, ties in input order
    assert chunks[0] == [0, 5] and len(chunks) > 2  # the two longest fill the budget; the short ones share batches
    assert all(len(c) == 1 or lengths[c[0]] * len(c) <= budget for c in chunks)
    assert all(lengths[c[0]] * (len(c) + 1) > budget for c in chunks[:-1])  # each full before the next opens
    assert batch_chunks(lm, prompts, EvalSettings(batch_size=4, batch_tokens=None), None) == [by_len[:4], by_len[4:]]
    assert batch_chunks(lm, prompts, EvalSettings(batch_tokens=1), None) == [[i] for i in by_len]

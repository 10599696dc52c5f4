import json

import numpy as np
import pytest
import torch

from dpolens import load_model
from dpolens.stages.alternatives import AlternativesConfig, headline, run_alternatives, section
from dpolens.artifacts import DpolensError
from dpolens.directions import save_probe
from dpolens.evaluate import EvalData, EvalSettings


# toxicity per prompt as the scorer is made to say (a tiny random model's continuations score ~0 for
# every model, so the recovery share would be undefined and every check of it vacuous)
SCRIPTED = {"base": [0.6, 0.5, 0.4], "bias": [0.2, 0.1, 0.0], "bias un-aligned": [0.5, 0.3, 0.1]}


def script_toxicity(monkeypatch):
    import dpolens.stages.alternatives as alt

    real = alt.evaluate_inputs

    def scripted(lm, d, inputs, intervention=None, label="", out_dir=None):
        res = real(lm, d, inputs, intervention, label, out_dir)
        if label in SCRIPTED:
            for rec, t in zip(res.records, SCRIPTED[label], strict=True):
                rec["toxicity"] = t
            res.toxicity = {**res.toxicity, "mean": float(np.mean(SCRIPTED[label]))}
        return res

    monkeypatch.setattr(alt, "evaluate_inputs", scripted)


def test_alternatives_table_measures_each_variant(tiny_dirs, tmp_path, jigsaw_cached, monkeypatch):
    script_toxicity(monkeypatch)
    base = load_model(tiny_dirs["gpt2"])
    save_probe(tmp_path / "probe.safetensors", base.adapter.value_vectors(1)[5].clone(), 0.0, base, {})
    # a "bias-only" variant: one MLP output bias of layer 1 moved, nothing else
    variant = load_model(tiny_dirs["gpt2"])
    with torch.no_grad():
        variant.adapter.mlp_out_proj(1).bias.add_(0.5)
    (tmp_path / "bias").mkdir()
    variant.model.save_pretrained(tmp_path / "bias" / "model")
    variant.tokenizer.save_pretrained(tmp_path / "bias" / "model")
    (tmp_path / "bias" / "summary.json").write_text(json.dumps({"trainable": {"trainable": "bias"}, "steps": 3}))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Holy", "You are", "So I"]))
    (tmp_path / "f1.jsonl").write_text("".join(json.dumps({"prompt": p, "gold": "the dog"}) + "\n" for p in ["A", "B"]))
    ev = EvalData(prompts=str(tmp_path / "p.jsonl"), f1_data=str(tmp_path / "f1.jsonl"),
                  wikitext=str(tmp_path / "w.raw"), progress=False,
                  settings=EvalSettings(max_new_tokens=3))
    cfg = AlternativesConfig(base=str(tiny_dirs["gpt2"]), variants={"bias": str(tmp_path / "bias")},
                             probe=str(tmp_path / "probe.safetensors"), out=str(tmp_path / "alt"), k=2,
                             space="raw", offset_prompts=str(tmp_path / "p.jsonl"), max_new_tokens=3, eval=ev,
                             transforms=["plain", "rot13", "multi_turn"], neutral=[str(tmp_path / "w.raw")],
                             n_boot=200)
    (tmp_path / "w.raw").write_text("The quick brown fox jumps over the lazy dog again today.\n" * 20)
    res = run_alternatives(cfg)
    b, v = res["rows"]
    assert b["variant"] == "base" and v["variant"] == "bias" and v["trainable"] == "bias"
    assert v["weight_shift"]["changed_tensors"] == 1 and v["weight_shift"]["min_cosine"] < 1
    groups = v["neuron_groups"]  # a bias moved: no value vector moved, so activations alone carry any reduction
    assert set(groups["share_of_positive"]) == {"TP-", "TN+", "AP+", "AN-"}
    four = groups["four_groups_share_of_positive"]  # every neuron falls in one of the four groups here
    assert four == pytest.approx(sum(groups["share_of_positive"].values())) == pytest.approx(1.0)
    assert all(0 < x < 1 for x in groups["share_of_positive"].values())
    assert v["patched"] is None and v["patch_replicates"] is None  # the evaluation used every prompt
    anti = v["value_shift_stats"]["share_anti_aligned"]
    assert anti["n"] == 0 and anti["mean"] is None  # a bias moved, no value vector
    norms = [o["norm"] for o in v["offset"]]
    assert norms[0] == 0 and norms[1] == 0 and norms[2] > 0  # resid_mid sees layer 1's MLP from layer 2 on
    rel = np.array([o["relative_norm"] for o in v["offset"]])
    assert v["offset_stats"]["slope"]["mean"] == pytest.approx(np.polyfit(np.arange(3), rel, 1)[0])
    lo, hi = v["offset_stats"]["slope"]["ci95"]
    assert lo <= hi and v["offset_stats"]["slope"]["n"] == 3
    ret = v["retention"]  # the variant's own offset, by definition fully applied on plain prompts where it exists
    assert set(ret) == {"plain", "rot13", "multi_turn"} and ret["plain"]["retention"] == pytest.approx([0, 0, 1])
    assert all(r["retention_ci95"][0] <= r["retention_mean"] <= r["retention_ci95"][1] + 1e-9 for r in ret.values())
    assert len(v["unaligned"]["keys"]) == 2 and (v["unaligned"]["keys"][0]["layer"], v["unaligned"]["keys"][0]["neuron"]) == (1, 5)
    # the scripted toxicities: base 0.5, variant 0.1, un-aligned 0.3 -> half of the 0.4 gap comes back
    assert (b["toxicity"]["mean"], v["toxicity"]["mean"]) == (pytest.approx(0.5), pytest.approx(0.1))
    assert v["unaligned"]["toxicity"]["mean"] == pytest.approx(0.3)
    assert v["unalign_recovery"] == pytest.approx(0.5)
    ci = v["unalign_recovery_ci95"]  # paired over the 3 prompts (the gap is 0.4 on each: clear of zero)
    assert 0.25 <= ci[0] <= 0.5 <= ci[1] <= 0.75  # the share lies inside its own interval
    assert v["patch_replicates_ci95"] is None
    paired = v["vs_base"]  # the variant against the base on the same prompts, F1 rows and PPL windows
    assert paired["toxicity_diff"]["diff"] == pytest.approx(v["toxicity"]["mean"] - b["toxicity"]["mean"])
    assert paired["toxicity_diff"]["n"] == 3 and paired["ppl_ratio"]["n"] == len(b["ppl_window_nll"]) > 1
    assert paired["ppl_ratio"]["ratio"] == pytest.approx(v["perplexity"] / b["perplexity"])
    assert paired["f1"]["mean"] == pytest.approx(v["f1"]) and paired["f1"]["n"] == 2
    alt = json.loads((tmp_path / "alt" / "alternatives.json").read_text())
    del alt["rows"][1]["vs_base"]  # a file written before vs_base existed: read back with it
    (tmp_path / "alt" / "alternatives.json").write_text(json.dumps(alt))
    assert headline(tmp_path / "alt")["rows"][1]["vs_base"] == json.loads(json.dumps(paired))
    table = (tmp_path / "alt" / "alternatives.md").read_text()
    assert "| toxicity − base | PPL | PPL / base | F1 |" in table and f"×{paired['ppl_ratio']['ratio']:.3f}" in table
    assert "\n| base |" in table and "\n| bias | dpo | bias | sigmoid |" in table
    assert res["figures"] == ["fig_offset_by_variant.png", "fig_offset_by_variant.pdf"]
    assert (tmp_path / "alt" / "fig_offset_by_variant.png").stat().st_size > 0
    assert res["finding"] in table and "hardest to undo by key scaling: bias" in res["finding"]
    html = section(tmp_path / "alt", headline(tmp_path / "alt"), {})  # the report's section
    assert "dv_anti_aligned" in html and "share TP-" in html and 'alt="fig_offset_by_variant"' in html
    assert "PPL / base" in html and "final_cos_probe" in html
    assert "offset_slope" in html and "retention rot13" in html and "| bias | " in table.split("Offset retention")[1]
    with pytest.raises(DpolensError, match="no variants"):
        run_alternatives(AlternativesConfig(base=str(tiny_dirs["gpt2"]), probe=cfg.probe, out=cfg.out))


def test_alternatives_trains_methods_from_the_same_pairs(tiny_dirs, tmp_path, jigsaw_cached):
    from dpolens.config import ConfigError
    from dpolens.training import TrainConfig
    from test_pairs_dpo import write_pairs

    base = load_model(tiny_dirs["gpt2"])
    save_probe(tmp_path / "probe.safetensors", base.adapter.value_vectors(1)[5].clone(), 0.0, base, {})
    write_pairs(tmp_path / "pairs.jsonl", 12)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Holy", "You are", "So I"]))
    ev = EvalData(prompts=str(tmp_path / "p.jsonl"), f1_data=None, wikitext=None, progress=False, limit=2,
                  settings=EvalSettings(max_new_tokens=3))
    train = TrainConfig(pairs=str(tmp_path / "pairs.jsonl"), learning_rate=1e-3, warmup_steps=0, val_pairs=4,
                      eval_steps=2, max_steps=2)
    cfg = AlternativesConfig(base=str(tiny_dirs["gpt2"]), methods=["dpo", "kto"], train=train,
                             probe=str(tmp_path / "probe.safetensors"), out=str(tmp_path / "alt"), k=2, space="raw",
                             offset_prompts=str(tmp_path / "p.jsonl"), max_new_tokens=3, eval=ev,
                             transforms=["plain", "upper"], n_boot=100)
    res = run_alternatives(cfg)
    assert [(r["variant"], r.get("method"), r.get("steps")) for r in res["rows"]] == \
        [("base", None, None), ("dpo", "dpo", 2), ("kto", "kto", 2)]
    assert all(0 < r["weight_shift"]["min_cosine"] < 1 for r in res["rows"][1:])
    assert (tmp_path / "alt" / "kto" / "model" / "config.json").exists()
    for r in res["rows"][1:]:  # groups fitted on the one prompt the evaluation leaves, patching evaluated on 2
        assert r["patched"]["n_fit_prompts"] == 1 and r["patched"]["toxicity"]["n"] == 2
        gap = res["rows"][0]["toxicity"]["mean"] - r["toxicity"]["mean"]
        assert (r["patch_replicates"] is None) == (gap <= 0 or gap < 0.1 * res["rows"][0]["toxicity"]["mean"])
    assert all(set(r["retention"]) == {"plain", "upper"} for r in res["rows"][1:])
    with pytest.raises(ConfigError, match="unknown method 'ppo'"):
        AlternativesConfig(methods=["ppo"])
    with pytest.raises(ConfigError, match="unknown transform 'rot14'"):
        AlternativesConfig(transforms=["plain", "rot14"])
    with pytest.raises(ConfigError, match="must include 'plain'"):
        AlternativesConfig(transforms=["rot13"])


def test_a_placebo_variant_holds_no_mechanism_row(tiny_dirs, tmp_path, tokenizer, jigsaw_cached):
    """Issue #31: a "variant" that is the base plus noise. Its offset growth and offset retention under
    transforms are measured for placebo draws of its size on the same prompts, halves and resamples; no
    mechanism row of the variant may read holds, and each row shows the placebo and the difference."""
    import dataclasses

    from conftest import save_perturbed
    from dpolens.claims import registered_claims
    from dpolens.ledger import StageContext, decide
    from dpolens.stages.alternatives import variant_measures

    base = load_model(tiny_dirs["llama"])
    save_probe(tmp_path / "probe.safetensors", base.adapter.value_vectors(1)[5].clone(), 0.0, base, {})
    save_perturbed("llama", tokenizer, tmp_path / "noise" / "model", 1e-2)
    prompts = ["Holy cow", "You are such a piece of", "So I am", "The weather", "Nice to", "What a", "Go away now",
               "I think that", "They said", "Later on we", "Oh no", "Why is"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (tmp_path / "w.raw").write_text("The quick brown fox jumps over the lazy dog again today.\n" * 20)
    ev = EvalData(prompts=str(tmp_path / "p.jsonl"), f1_data=None, wikitext=None, progress=False, limit=3,
                  settings=EvalSettings(max_new_tokens=3))
    cfg = AlternativesConfig(base=str(tiny_dirs["llama"]), variants={"noise": str(tmp_path / "noise")},
                             probe=str(tmp_path / "probe.safetensors"), out=str(tmp_path / "alt"), k=2, space="raw",
                             offset_prompts=str(tmp_path / "p.jsonl"), max_new_tokens=4, eval=ev, patch=False,
                             transforms=["plain", "rot13", "upper", "multi_turn"], neutral=[str(tmp_path / "w.raw")],
                             n_boot=300, control_draws=3, batch_size=6)
    res = run_alternatives(cfg)
    v = res["rows"][1]
    assert res["split"]["fit"] + res["split"]["measure"] == len(prompts)
    ctl = v["control"]
    assert ctl["draws"] == 3 and len({m["weight_sha256"] for m in ctl["models"]}) == 3
    assert len(ctl["rows"]) == 3 * 4 and all(len(x["retention_per_prompt"]) == res["split"]["measure"]
                                             for x in ctl["rows"])
    assert v["offset_stats"]["control"] and v["offset_stats"]["vs_control"]
    by_id = {c.id: c for _, c in registered_claims()}
    ctx = StageContext(tmp_path / "alt", n_boot=300)
    (measures,) = variant_measures(ctx)
    decided = 0
    for cid in ("offset_grows", "transforms_weaken_offset", "multi_turn_weakens_offset"):
        claim = dataclasses.replace(by_id[cid], build=lambda _ctx, b=measures["measures"][cid]: b())
        row = decide(claim, ctx)
        assert claim.mechanism and row["verdict"] != "holds", row
        assert row["placebo"] is not None and row["placebo"]["difference_verdict"] != "holds", row
        decided += decide(dataclasses.replace(claim, mechanism=False), ctx)["verdict"] == "holds"
    # measured (2026-12-06): on its own statistic each row holds for this noise (offset slope 0.20 [0.07, 0.34],
    # plain − encoded retention 0.24 [0.11, 0.44], plain − multi-turn 0.55 [0.38, 0.81]): the placebo stops all three
    assert decided == 3

import json

import pytest

from dpolens.stages.robustness import RobustnessConfig, findings, run_robustness
from dpolens.transforms import TRANSFORMS, multi_turn

from conftest import save_perturbed


@pytest.mark.parametrize("name", [n for n in TRANSFORMS if n != "upper"])
def test_transforms_invert(name):
    fwd, inv = TRANSFORMS[name]
    text = "so i am starting to think she is full of it"
    assert inv(fwd(text)) == text


def test_multi_turn_accumulates_turns():
    out = multi_turn(["p1", "p2"], ["n1", "n2"], 3, seed=0)
    assert out[0].endswith("User: p1") and out[0].count("User:") == 4 and out[0].count("Assistant:") == 3


def test_findings_state_retention_and_toxicity():
    def row(t, model, tox, ret):
        return {"transform": t, "model": model, "toxicity": {"mean": tox}, "retention": ret}

    rows = [row("plain", "base", 0.3, []), row("plain", "aligned", 0.1, [1.0, 1.0]),
            row("rot13", "base", 0.1, []), row("rot13", "aligned", 0.2, [0.9, 0.5]),
            row("rot13", "unaligned", 0.25, []), row("upper", "base", 0.3, []), row("upper", "aligned", 0.2, [0.1, 0.3])]
    plain, rot13, upper = findings(rows)
    assert plain == "plain: the offset persists (mean retention 1.00, min 1.00); toxicity base 0.300 → aligned 0.100"
    assert rot13.startswith("rot13: the offset persists (mean retention 0.70, min 0.50)")
    assert "→ un-aligned 0.250" in rot13 and rot13.endswith("no less toxic than the base here")
    assert upper.startswith("upper: the offset is mostly lost (mean retention 0.20") and "no less toxic" not in upper


def test_run_robustness_retention(tiny_dirs, tmp_path, tokenizer, jigsaw_cached):
    save_perturbed("llama", tokenizer, tmp_path / "aligned", 1e-2)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                                              ["Holy cow", "You are such a piece of", "So I am"]))
    (tmp_path / "w.raw").write_text("The quick brown fox jumps over the lazy dog again today.\n")
    r = run_robustness(RobustnessConfig(base=str(tiny_dirs["llama"]), aligned=str(tmp_path / "aligned"),
                                        unaligned=str(tmp_path / "aligned"), out=str(tmp_path / "r"),
                                        prompts=str(tmp_path / "p.jsonl"), neutral=[str(tmp_path / "w.raw")],
                                        max_new_tokens=3, batch_size=3, max_prompt_tokens=120))  # tiny context: 128
    rows = r["rows"]
    assert {(x["transform"], x["model"]) for x in rows} == {
        (t, m) for t in [*TRANSFORMS, "multi_turn"] for m in ("base", "aligned", "unaligned")}
    # δx̂ from one prompt, every retention on the other two: plain retention is measured, not 1 by construction
    assert r["split"]["fit"] == 1 and r["split"]["measure"] == 2
    plain = next(x for x in rows if x["transform"] == "plain" and x["model"] == "aligned")
    assert plain["retention"] != pytest.approx([1.0] * 3)
    assert all(len(x["retention"]) == 3 for x in rows if x["model"] != "base")
    for x in rows:  # per-prompt retention, token-weighted, averages to the per-layer retention's mean
        if x["model"] != "base":
            assert x["retention_mean"] == pytest.approx(sum(x["retention"]) / 3, rel=1e-4, abs=1e-6)
            assert len(x["retention_per_prompt"]) == len(x["tokens_per_prompt"]) == 2
            assert x["retention_ci95"][0] <= x["retention_ci95"][1]
    assert (tmp_path / "r" / "robustness.md").exists() and (tmp_path / "r" / "fig_retention.png").exists()


def test_long_prompts_keep_bos_and_final_turn(tiny_dirs):
    from dpolens import load_model
    from dpolens.model.generation import encode_prompts

    lm = load_model(tiny_dirs["llama"])
    text = "User: " + "word " * 200 + "\nUser: the final turn"
    full = lm.tokenizer(text)["input_ids"]
    (ids,) = encode_prompts(lm, [text], 16, keep_last=True)
    assert len(ids) == 16 and ids[0] == full[0] == lm.tokenizer.bos_token_id and ids[1:] == full[-15:]
    assert encode_prompts(lm, [text], 16)[0] == full[:16]


def test_multi_turn_is_measured_on_its_final_turn(tiny_dirs):
    from dpolens import load_model
    from dpolens.transforms import final_turn_seqs

    lm = load_model(tiny_dirs["llama"])
    texts = ["User: you are bad\nAssistant: The sky is blue.\nUser: the final turn",
             "User: " + "word " * 200 + "\nUser: another last turn here"]
    seqs = final_turn_seqs(lm, texts, 64)
    for (ctx, turn), t in zip(seqs, texts):
        assert lm.tokenizer.decode(turn).strip() == t[t.rfind("\nUser:"):].strip()
        assert len(ctx) + len(turn) <= 64 and ctx[0] == lm.tokenizer.bos_token_id


def test_subset_offsets_average_to_the_whole():
    """subset_mean on every prompt is mean_x; the δx̂ of one half, applied to the other, is what retention reads."""
    import torch

    from dpolens.activations import Stats
    from dpolens.transforms import offset_retention, subset_mean

    g = torch.Generator().manual_seed(0)
    tokens = torch.tensor([3.0, 5.0, 2.0, 4.0])
    per = {l: torch.randn(4, 6, generator=g) for l in range(2)}
    x_sum = torch.stack([(per[l] * tokens[:, None]).sum(0) for l in range(2)])
    base = Stats(torch.zeros(2, 1), torch.zeros(2, 1), x_sum, int(tokens.sum()), tokens, per)
    assert torch.allclose(subset_mean(base, range(4)), base.mean_x, atol=1e-6)
    shift = torch.randn(2, 6, generator=g)  # a model that adds the same offset to every prompt
    moved = Stats(torch.zeros(2, 1), torch.zeros(2, 1), x_sum + shift * tokens.sum(), int(tokens.sum()), tokens,
                  {l: per[l] + shift[l] for l in range(2)})
    delta = subset_mean(moved, [0, 1]) - subset_mean(base, [0, 1])
    r = offset_retention(delta, base, moved, 0, units=[2, 3])
    assert r["retention"] == pytest.approx([1.0, 1.0]) and r["retention_mean"] == pytest.approx(1.0)
    assert len(r["retention_per_prompt"]) == 2


def test_robustness_rows_are_compared_with_placebos(tiny_dirs, tmp_path, tokenizer, jigsaw_cached):
    """Issue #31: the "aligned" model here is a placebo (the base plus noise). Its offset retention is compared with
    that of placebo draws on the same halves and resamples; the mechanism rows must not read holds."""
    import dataclasses

    from dpolens.ledger import StageContext, decide
    from dpolens.stages import robustness

    save_perturbed("llama", tokenizer, tmp_path / "aligned", 1e-2)
    prompts = ["Holy cow", "You are such a piece of", "So I am", "The weather", "Nice to", "What a", "Go away now",
               "I think that", "They said", "Later on we"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (tmp_path / "w.raw").write_text("The quick brown fox jumps over the lazy dog again today.\n")
    r = run_robustness(RobustnessConfig(base=str(tiny_dirs["llama"]), aligned=str(tmp_path / "aligned"),
                                        out=str(tmp_path / "r"), prompts=str(tmp_path / "p.jsonl"),
                                        neutral=[str(tmp_path / "w.raw")], max_new_tokens=3, batch_size=5,
                                        max_prompt_tokens=120, toxicity_limit=2, control_draws=3))
    ctl = r["control"]
    n_transforms = len({x["transform"] for x in r["rows"]})
    assert ctl["draws"] == 3 and len(ctl["rows"]) == 3 * n_transforms
    assert len({m["weight_sha256"] for m in ctl["models"]}) == 3
    assert all(len(x["retention_per_prompt"]) == r["split"]["measure"] for x in ctl["rows"])
    ctx = StageContext(tmp_path / "r", n_boot=500)
    for claim in robustness.CLAIMS:
        row = decide(claim, ctx)
        assert claim.mechanism and row["verdict"] != "holds", row
        assert row["placebo"] is not None and row["placebo"]["difference_verdict"] != "holds", row
        # measured (2026-12-06): on its own statistic each row holds for this placebo (plain − encoded retention
        # 0.39 [0.24, 0.53], plain − multi-turn 0.63 [0.43, 0.93]); placebos weaken the same way
        assert decide(dataclasses.replace(claim, mechanism=False), ctx)["verdict"] == "holds"


def test_transforms_measured_on_the_measuring_half_alone_read_as_on_all_prompts(tiny_dirs, tmp_path, tokenizer,
                                                                                jigsaw_cached):
    """Issue #34: the stage runs each transform other than plain on the measuring half only; its retention must be
    what the whole set's statistics give on that half (the definition before the cut)."""
    from dpolens.compare import placebo
    from dpolens.data import load_prompts, wikitext_prompts
    from dpolens.drift import split_halves
    from dpolens.model.loading import load_model
    from dpolens.transforms import (final_turn_seqs, offset_retention, prompt_stats, prompt_token_seqs,
                                    subset_mean, transformed_prompts)

    save_perturbed("llama", tokenizer, tmp_path / "aligned", 1e-2)
    prompts = ["Holy cow", "You are such a piece of", "So I am", "The weather", "Nice to", "What a", "Go away now",
               "I think that", "They said", "Later on we"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (tmp_path / "w.raw").write_text("The quick brown fox jumps over the lazy dog again today.\n")
    cfg = RobustnessConfig(base=str(tiny_dirs["llama"]), aligned=str(tmp_path / "aligned"), out=str(tmp_path / "r"),
                           prompts=str(tmp_path / "p.jsonl"), neutral=[str(tmp_path / "w.raw")], max_new_tokens=2,
                           batch_size=4, max_prompt_tokens=120, toxicity_limit=1, control_draws=1,
                           transforms=["plain", "rot13", "multi_turn"])
    r = run_robustness(cfg)
    base, aligned = load_model(cfg.base), load_model(cfg.aligned)
    inputs = transformed_prompts(load_prompts(cfg.prompts), cfg.transforms, wikitext_prompts(cfg.neutral), cfg.turns,
                                 cfg.seed)
    fit, measure = split_halves(len(prompts), cfg.seed)
    full = {t: (final_turn_seqs if t == "multi_turn" else prompt_token_seqs)(base, inputs[t][0], cfg.max_prompt_tokens)
            for t in inputs}
    sb = {t: prompt_stats(base, s, 3) for t, s in full.items()}  # another batch size, every prompt
    sa = {t: prompt_stats(aligned, s, 3) for t, s in full.items()}
    delta = subset_mean(sa["plain"], fit) - subset_mean(sb["plain"], fit)
    c = placebo(base, aligned, cfg.seed)  # the stage's one draw, on the same prompts
    sc = {t: prompt_stats(c, s, 3) for t, s in full.items()}
    delta_c = subset_mean(sc["plain"], fit) - subset_mean(sb["plain"], fit)
    by = {x["transform"]: x for x in r["rows"] if x["model"] == "aligned"}
    drawn = {x["transform"]: x for x in r["control"]["rows"] if x["draw"] == 0}
    for t in inputs:
        for got, want in ((by[t], offset_retention(delta, sb[t], sa[t], cfg.seed, measure)),
                          (drawn[t], offset_retention(delta_c, sb[t], sc[t], cfg.seed, measure))):
            assert got["retention"] == pytest.approx(want["retention"], rel=1e-4, abs=1e-6), t
            assert got["retention_per_prompt"] == pytest.approx(want["retention_per_prompt"], rel=1e-4, abs=1e-6), t
            assert got["retention_ci95"] == pytest.approx(want["retention_ci95"], rel=1e-4, abs=1e-6), t
    assert r["split"]["holdout"] == 0

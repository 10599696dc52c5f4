"""The whole study on a tiny model: every stage, results.json, report, caching and resume."""

import json
import os
import re
import time

import pytest
import yaml

from browser import CHROMIUM, browser_check

from dpolens.pipeline import load_study, run_study
from dpolens.textquality import overused_words
from dpolens.report import write_report
from dpolens.stages import REGISTRY

STAGES = [s.name for s in REGISTRY if not s.optional]

TOXIC = ["you stupid idiot", "shut up idiot", "what a stupid moron", "idiot idiot stupid", "moron stupid"]
CLEAN = ["thank you kindly", "the weather is nice", "a calm sentence here", "have a great day", "nice book"]


@pytest.fixture
def study_file(tmp_path, tiny_dirs):
    d = tmp_path / "data"
    d.mkdir()
    (d / "corpus.jsonl").write_text("".join(json.dumps({"text": f"{t} {i}", "label": lab}) + "\n"
                                            for i in range(6) for lab, ts in ((1, TOXIC), (0, CLEAN)) for t in ts))
    (d / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                                       ["Holy", "You are such a", "So I am", "The weather", "Holy cow", "Nice"]))
    (d / "f.jsonl").write_text(json.dumps({"prompt": "The quick", "gold": "brown fox"}) + "\n")
    (d / "w.raw").write_text("\n".join(f"The quick brown fox number {i} jumps over the lazy dog today. "
                                       f"Another calm sentence about the weather number {i} follows." for i in range(20)))
    ev = {"prompts": str(d / "p.jsonl"), "f1_data": str(d / "f.jsonl"), "wikitext": str(d / "w.raw"),
          "progress": False, "settings": {"max_new_tokens": 3, "batch_size": 6, "ppl_max_tokens": 64}}
    study = {
        "name": "tiny", "root": str(tmp_path / "runs"), "model": str(tiny_dirs["gemma3"]),
        "probe": {"data": [str(d / "corpus.jsonl")], "max_examples": None, "val_fraction": 0.25, "progress": False},
        "vectors": {"top_n": 8},
        "table2": {"calibration": {"alpha": 1.0}, "eval": ev, "table3_prompts": ["Holy"]},
        # random tiny models write no toxic text: the quality gate is opened (tested in test_pairs_dpo)
        "pairs": {"prompts": [str(d / "w.raw")], "n": 12, "max_new_tokens": 3, "batch_size": 6, "progress": False,
                  "gate": {"require_more_toxic": False, "min_toxicity_gap": -1.0, "max_nll_gap": None}},
        "dpo": {"learning_rate": 1e-4, "warmup_steps": 0, "val_pairs": 4, "eval_steps": 1, "max_steps": 2, "eval": ev},
        "analyze": {"prompts": str(d / "p.jsonl"), "lens_search": [str(d / "w.raw")], "lens_token": "Holy",
                    "top_neurons": 4, "max_new_tokens": 3, "figure_layers": 2},
        "unalign": {"k": 2, "eval": ev},
        "neurons": {"fit_prompts": 3, "top_toxic": 8, "cluster_sample": 100, "max_new_tokens": 3, "eval": ev},
        "robustness": {"prompts": str(d / "p.jsonl"), "neutral": [str(d / "w.raw")], "max_new_tokens": 3,
                       "max_prompt_tokens": 120,
                       "limit": 3},
    }
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(study))
    return p


def test_study_end_to_end_caches_and_reports(study_file, tmp_path, jigsaw_cached, monkeypatch):
    import sys

    from dpolens.model import loading

    devices = []  # every model load of every stage, with the device it was asked for

    def recording_load(ref, *args, **kwargs):
        devices.append((str(ref), kwargs.get("device")))
        return real_load(ref, *args, **kwargs)

    real_load = loading.load_model
    for st in REGISTRY:
        st.api  # import every stage module before recording
    for name, module in list(sys.modules.items()):
        if name.startswith("dpolens") and getattr(module, "load_model", None) is real_load:
            monkeypatch.setattr(module, "load_model", recording_load)
    study = load_study(study_file, ["device=cpu"])
    r = run_study(study)
    assert len(devices) >= len(STAGES) and all(d == "cpu" for _, d in devices), devices
    run = tmp_path / "runs" / "tiny"
    assert all((run / s / ".dpolens-stage.json").exists() for s in STAGES)
    assert set(STAGES) <= set(r) and not set(r) - {*STAGES, "provenance", "wall_time_s", "stage_time_s", "claims"}
    for stage, key in (("probe", "accuracy"), ("vectors", "toxic_vectors"), ("table2", "rows"), ("pairs", "quality"),
                       ("dpo", "training"), ("dpo", "weight_shift"), ("dpo", "eval"), ("analyze", "activation_drop"),
                       ("analyze", "offset"), ("unalign", "rows"), ("neurons", "neuron_groups"),
                       ("neurons", "patching"), ("robustness", "rows"), ("robustness", "findings")):
        assert r[stage][key] is not None and r[stage][key] != [], (stage, key)  # results.json keyed by stage
    assert r["provenance"]
    assert r["wall_time_s"] > 0 and set(r["provenance"]["stage_times"]) == set(STAGES)
    # one evaluation per (model, intervention, inputs): table2's base row is dpo's and unalign's base row
    cached = [json.loads(p.read_text()) for p in (run / "evals").glob("*.json")]
    base_rows = [c for c in cached if c["model"]["ref"] == str(study.model) and not c["intervention"]
                 and len(c["result"]["records"]) == 6]
    assert len(base_rows) == 1  # neurons' reference rows are on the prompts after its fit split
    dpo_eval = json.loads((run / "dpo" / "eval.json").read_text())
    dpo_base = dpo_eval["rows"][0]
    # the over-used words are counted in the base's and the aligned model's own continuations (cached)
    # (the aligned model with its token writers' keys scaled, unalign's writers variant, has its own weight hash)
    aligned_hash = dpo_eval["rows"][1]["weight_sha256"]
    aligned_rows = [c for c in cached if c["model"]["ref"].endswith("dpo/model") and not c["intervention"]
                    and len(c["result"]["records"]) == 6 and c["model"]["weight_sha256"] == aligned_hash]
    assert len(aligned_rows) == 1 and isinstance(dpo_eval["warnings"], list)
    writers_row = next(x for x in json.loads((run / "unalign" / "table.json").read_text())["rows"]
                       if x["model"] == "unaligned-token-writers")
    assert writers_row["weight_sha256"] != aligned_hash
    texts = [[x["continuation"] for x in rows[0]["result"]["records"]] for rows in (base_rows, aligned_rows)]
    assert dpo_eval["overused_words"] == overused_words(*texts)  # base first, then aligned: not swapped
    for w in dpo_eval["overused_words"]:
        for side, rows in (("base_share", base_rows), ("aligned_share", aligned_rows)):
            texts = [x["continuation"].lower() for x in rows[0]["result"]["records"]]
            assert w[side] == sum(w["word"] in re.findall(r"[a-z0-9']+", t) for t in texts) / len(texts), (w, side)
    assert r["dpo"]["training"]["overused_words"] == dpo_eval["overused_words"]  # results.json has the check
    assert dpo_base["toxicity_per_prompt"] == [x["toxicity"] for x in base_rows[0]["result"]["records"]]
    ledger = json.loads((run / "claims.json").read_text())
    assert len(ledger["rows"]) >= 13 and sum(r["claims"].values()) == len(ledger["rows"])
    assert all(r["verdict"] == "holds" or r["diagnosis"] for r in ledger["rows"])
    assert {r["id"]: r["n"] for r in ledger["rows"]}["dpo_lowers_toxicity"] == 6  # paired over the 6 prompts
    (run / "claims.json").unlink()  # the report rebuilds a missing ledger
    page = write_report(run).read_text()
    assert (run / "claims.json").exists()
    assert page.index("<h2>") == page.index("<h2>Claims</h2>")  # the first section
    assert page.count("<img") >= 5 and "Table 2" in page and "<td>" in page
    assert r["robustness"]["findings"] and "Does the offset persist?" in page
    assert "<td>None</td>" not in page and "<td>–</td>" in page  # base rows have no retention
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: `make test` installs Debian's chromium (see Makefile)")
    seen = browser_check(run / "report.html", tmp_path)
    assert seen["images"] == page.count("<img") and seen["broken_images"] == 0, seen
    assert seen["tables"] >= 5 and seen["empty_tables"] == 0, seen

    again = run_study(load_study(study_file, ["device=cpu"]))  # nothing changed: every stage is skipped
    assert all(t["skipped"] for t in again["provenance"]["stage_times"].values())
    assert again["stage_time_s"] == pytest.approx(r["stage_time_s"])  # the earlier run's cost, counted once
    changed = run_study(load_study(study_file, ["device=cpu", "robustness.limit=2"]), only=["robustness"])
    assert changed["provenance"]["stage_times"]["robustness"]["skipped"] is False
    # an interrupted attempt (started 100 s ago, last wrote 40 s ago) counts in the resumed stage's time
    marker = run / "robustness" / ".dpolens-stage.json"
    m = json.loads(marker.read_text())
    now = time.time()
    marker.write_text(json.dumps({"stage": "robustness", "key": m["key"], "finished": False, "started": now - 100,
                                  "alive": now - 50}))
    partial = run / "robustness" / "partial.jsonl"
    partial.write_text("{}\n")
    os.utime(partial, (now - 40, now - 40))
    for f in (run / "robustness").rglob("*"):
        if f.is_file() and f.name not in (marker.name, partial.name):
            os.utime(f, (now - 90, now - 90))
    resumed = run_study(load_study(study_file, ["device=cpu", "robustness.limit=2"]), only=["robustness"])
    done = json.loads(marker.read_text())
    assert done["earlier_attempts_s"] == pytest.approx(60, abs=1)
    assert resumed["provenance"]["stage_times"]["robustness"]["wall_time_s"] == pytest.approx(done["wall_time_s"])
    assert done["wall_time_s"] > done["earlier_attempts_s"]


def test_unknown_stage_key_is_named(study_file):
    from dpolens.config import ConfigError

    with pytest.raises(ConfigError, match="unknown config key 'probe.max_exemples'"):
        from dpolens.pipeline import stage_configs

        stage_configs(load_study(study_file, ["probe.max_exemples=3"]))


def test_stage_key_names_settings_not_defaults():
    """A setting added with a default that keeps what was computed leaves finished stages valid;
    any setting that differs from its default changes the key."""
    from dataclasses import dataclass, field, make_dataclass

    from dpolens.pipeline import _key

    @dataclass
    class Inner:
        limit: int | None = None

    @dataclass
    class Old:
        out: str = "x"
        inner: Inner = field(default_factory=Inner)

    New = make_dataclass("New", [("device", str, field(default="auto"))], bases=(Old,))
    assert _key(Old(out="runs/a"), []) == _key(New(out="runs/a"), [])
    assert _key(Old(out="runs/a"), []) != _key(New(out="runs/a", device="cuda"), [])
    assert _key(Old(inner=Inner(limit=3)), []) != _key(Old(), [])
    assert _key(Old(), ["k1"]) != _key(Old(), ["k2"])


def test_interrupted_attempt_lasts_to_its_last_sign_of_life(tmp_path):
    """The heartbeat's `alive` counts where it is later than the stage's files (a stage that writes
    only to the shared evaluation cache), and earlier attempts add up."""
    from dpolens.pipeline import earlier_attempts_s, heartbeat

    (tmp_path / "part.json").write_text("{}")
    now = time.time()
    os.utime(tmp_path / "part.json", (now - 80, now - 80))
    marker = {"started": now - 100, "alive": now - 30, "earlier_attempts_s": 5.0}
    assert earlier_attempts_s(tmp_path, marker) == pytest.approx(75, abs=1)
    assert earlier_attempts_s(tmp_path, {**marker, "alive": now - 90}) == pytest.approx(25, abs=1)
    assert earlier_attempts_s(tmp_path, {"earlier_attempts_s": 7.0}) == 7.0 and earlier_attempts_s(tmp_path, None) == 0
    beat = tmp_path / "marker.json"
    with heartbeat(beat, {"stage": "x"}, every_s=0.05):
        time.sleep(0.3)
    assert json.loads(beat.read_text())["alive"] >= now


def test_neurons_pairs_path_is_in_the_key_only_when_fitted_on_pairs():
    """Wiring the pairs file into neurons leaves the key of a study that fits on the evaluation prompts."""
    from dpolens.stages.neurons import NeuronsConfig
    from dpolens.pipeline import _key

    assert _key(NeuronsConfig(pairs="runs/x/pairs/pairs.jsonl"), []) == _key(NeuronsConfig(), [])
    assert _key(NeuronsConfig(fit_from="pairs", pairs="runs/x/pairs/pairs.jsonl"), []) != \
        _key(NeuronsConfig(fit_from="pairs"), [])


@pytest.fixture
def tied_llama(tmp_path, tokenizer):
    """A tiny Llama with SmolLM2's shape features: tied embeddings and grouped-query attention."""
    import transformers as tf

    from conftest import make_model

    model = make_model("llama", len(tokenizer))
    cfg = tf.LlamaConfig(**{**model.config.to_dict(), "tie_word_embeddings": True})
    torch_model = tf.LlamaForCausalLM(cfg)
    torch_model.load_state_dict(model.state_dict(), strict=False)
    torch_model.tie_weights()
    d = tmp_path / "tied-llama"
    torch_model.eval().save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def test_every_stage_runs_on_a_tied_gqa_llama(study_file, tied_llama, jigsaw_cached):
    """Every stage and the ledger on a Llama with tied embeddings and 4 query / 2 KV heads (issue #33)."""
    from dpolens import load_model

    lm = load_model(tied_llama)
    assert lm.model.config.tie_word_embeddings and lm.model.config.num_key_value_heads == 2
    assert lm.model.get_input_embeddings().weight is lm.model.get_output_embeddings().weight
    r = run_study(load_study(study_file, ["device=cpu", f"model={tied_llama}", "name=tied"]))
    assert set(STAGES) <= set(r) and all(r[s] for s in STAGES)
    assert r["dpo"]["models"]["base"]["family"] == "llama"
    assert sum(r["claims"].values()) == 21


def test_every_claim_at_each_strength(study_file, tmp_path, jigsaw_cached, monkeypatch, caplog):
    """dpo keeps a checkpoint at 25% and stops at 54% (scripted dev toxicity); the study repeats the stages after
    dpo on the 25% checkpoint and decides every ledger row at both strengths (issue #32), reading the base
    model's continuations and statistics back from the run's cache instead of computing them again (#34)."""
    import logging

    from dpolens.training import StrengthMonitor

    caplog.set_level(logging.INFO, logger="dpolens.memo")

    dev = iter([0.5, 0.35, 0.2, 0.1])  # base, then each checkpoint: 30% and 60% removed

    def scripted(self):
        return [next(dev)] * len(self.prompts)

    monkeypatch.setattr(StrengthMonitor, "_toxicity", scripted)
    study = yaml.safe_load(study_file.read_text())
    study["dpo"].update({"strengths": [0.25], "max_steps": 4})
    study["dose_response"] = ["analyze", "unalign", "neurons", "robustness"]
    study_file.write_text(yaml.safe_dump(study))
    r = run_study(load_study(study_file, ["device=cpu"]))
    run = tmp_path / "runs" / "tiny"
    assert r["dpo"]["training"]["steps"] == 2 and r["dpo"]["strength"]["reached"] == {"25": 1, "54": 2}
    for s in study["dose_response"]:
        assert (run / "strength-25" / s / ".dpolens-stage.json").exists(), s
        assert r["provenance"]["stage_times"][f"{s}@25"]["skipped"] is False
    man = json.loads((run / "strength-25" / "analyze" / "manifest.json").read_text())
    assert man["config"]["aligned"] == str(run / "dpo" / "strengths" / "25" / "model")
    rob = json.loads((run / "strength-25" / "robustness" / "manifest.json").read_text())
    assert rob["config"]["unaligned"] == str(run / "strength-25" / "unalign" / "model")
    # every base-model computation analyze, neurons and robustness stored was read back at 25%, none computed twice
    stored = sorted(p.name for p in (run / "evals" / "memo").iterdir())
    read = {r.getMessage().rsplit("/", 1)[-1] for r in caplog.records if r.name == "dpolens.memo"}
    assert len(stored) >= 2 + 7 * 2 + 2 and set(stored) == read, (stored, read)
    assert {n.split("-")[0] for n in stored} >= {"generate", "stats", "lens_search"}
    d = json.loads((run / "dose_response.json").read_text())
    assert [s["strength"] for s in d["strengths"]] in (["25%", "analysed"], ["analysed", "25%"])
    ledger = json.loads((run / "claims.json").read_text())
    assert len(d["claims"]) == len(ledger["rows"]) and all(len(c["at"]) == 2 for c in d["claims"])
    assert (run / "dose_response.md").read_text().count("\n| (") == len(d["claims"])
    at25 = {c["id"]: next(a for a in c["at"] if a["strength"] == "25%") for c in d["claims"]}
    analysed = {c["id"]: next(a for a in c["at"] if a["strength"] == "analysed") for c in d["claims"]}
    # the rows read the 25% model's own artifacts: its weights moved less than the analysed model's
    assert at25["weights_barely_move"]["effect"] > analysed["weights_barely_move"]["effect"]
    assert {k: v for k, v in analysed["probe_separates"].items() if k != "strength"} == \
        {k: v for k, v in at25["probe_separates"].items() if k != "strength"}  # shared stages: the same row
    assert r["dose_response"]["flip"] == [c["id"] for c in d["claims"] if c["flips"]]
    page = write_report(run).read_text()
    assert "Claims at each strength of the alignment" in page and (run / "fig_dose_response_claims.png").exists()
    # with only analyze repeated, the other stages' rows at 25% would describe the analysed model: not measured
    from dpolens.claims import dose_response

    part = {c["id"]: {a["strength"]: a["verdict"] for a in c["at"]} for c in dose_response(run, ["analyze"],
                                                                                            n_boot=100)["claims"]}
    assert part["unalign_restores"]["25%"] == "not measured" and part["offset_grows"]["25%"] != "not measured"
    assert part["dpo_lowers_toxicity"]["25%"] != "not measured" and part["probe_separates"]["25%"] != "not measured"
    # a re-run skips the repeated stages too
    again = run_study(load_study(study_file, ["device=cpu"]))
    assert all(t["skipped"] for t in again["provenance"]["stage_times"].values())


def test_dose_response_names_stages_that_read_the_dpo_model(study_file):
    from dpolens.config import ConfigError

    with pytest.raises(ConfigError, match="dose_response: 'probe' is not a stage of this study that reads the dpo"):
        load_study(study_file, ["dose_response=[probe]"])
    assert load_study(study_file, ["dose_response=[analyze, neurons]"]).dose_response == ["analyze", "neurons"]

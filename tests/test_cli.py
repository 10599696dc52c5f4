import json
import os
import subprocess
import sys

import pytest


from conftest import FAMILIES


def dpolens(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dpolens.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow  # runs the CLI in a subprocess
def test_inspect_json_every_family(tiny_dirs):
    for fam in FAMILIES:
        out = dpolens("inspect", str(tiny_dirs[fam]), "--json")
        assert out.returncode == 0, out.stderr
        info = json.loads(out.stdout)
        assert info["n_layers"] == 3 and info["d_model"] == 32
        assert info["family"] == {"gemma3": "gemma"}.get(fam, fam)


@pytest.mark.slow  # runs the CLI in a subprocess
def test_unknown_model_is_one_line_exit_2(tmp_path):
    out = dpolens("inspect", "no-such-org/no-such-model", env={"DPOLENS_CACHE": str(tmp_path),
                                                               "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "dpolens assets fetch" in out.stderr


def test_score_command(tmp_path, jigsaw_cached):
    src = tmp_path / "t.jsonl"
    src.write_text(json.dumps({"text": "you are a stupid idiot", "id": 1}) + "\n"
                   + json.dumps({"text": "thank you for the help", "id": 2}) + "\n")
    out = dpolens("score", "--input", str(src), "--out", str(tmp_path / "s.jsonl"))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(l) for l in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2]
    assert rows[0]["toxicity"] > 0.5 > rows[1]["toxicity"]
    assert set(rows[0]) >= {"toxic", "insult", "obscene", "scorer"}


def test_score_bad_row_names_line_and_field(tmp_path, jigsaw_cached):
    src = tmp_path / "t.jsonl"
    src.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    out = dpolens("score", "--input", str(src), "--out", str(tmp_path / "s.jsonl"))
    assert out.returncode == 2
    assert "t.jsonl:2: missing field 'text'" in out.stderr
    assert not (tmp_path / "s.jsonl").exists()
    out = dpolens("score", "--input", str(src), "--out", str(tmp_path / "s.jsonl"), "--skip-bad-rows")
    assert out.returncode == 0 and len((tmp_path / "s.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow  # runs the CLI in a subprocess
def test_unknown_set_key_exit_2(tiny_dirs, tmp_path):
    out = dpolens("eval", "--model", str(tiny_dirs["gpt2"]), "--set", "settings.max_new_tokns=3")
    assert out.returncode == 2
    assert "unknown config key 'settings.max_new_tokns'" in out.stderr


@pytest.mark.slow  # runs the CLI in a subprocess
def test_alternatives_variants_must_be_a_mapping():
    out = dpolens("alternatives", "--variants", "runs/dpo-bias")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "config key 'variants': expected a mapping" in out.stderr


def test_every_verb_lists_every_config_field_with_its_help():
    """CLI options come from the config dataclasses: the same path means the same field in every verb."""
    from typer.testing import CliRunner

    from dpolens.cli import app
    from dpolens.config import field_docs, flat_fields
    from dpolens.evaluate import EvalConfig
    from dpolens.stages import REGISTRY

    runner = CliRunner()
    flat = " ".join  # help pages wrap lines: compare with all whitespace collapsed
    for verb, cls in [("eval", EvalConfig), *[(s.name, s.config_class) for s in REGISTRY]]:
        page = runner.invoke(app, [verb, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"}).output
        assert page.startswith("Usage:"), (verb, page[:200])
        page = flat(page.split())
        for path, _, doc in flat_fields(cls):
            flag = "--" + path.replace("_", "-")
            assert flag in page, (verb, path)
            if doc:  # the whole help text, right after its own flag (not another field's)
                after = page[page.index(flag + " "):]
                assert flat(doc.split()) in after[: len(flag) + 40 + len(flat(doc.split()))], (verb, path, doc)
    assert field_docs(EvalConfig)["limit"]  # documented once in EvalData, inherited


def test_options_reach_the_config(tmp_path):
    from dpolens.cli import config_command
    from dpolens.stages.dpo import DpoConfig

    seen = []
    cmd = config_command(DpoConfig, "dpo", seen.append, lambda cfg: "ok")
    cmd(model="m", out=None, learning_rate=3e-6, eval__limit=5, precompute_ref=False, config=None,
        set_=["eval.settings.batch_size=7"], **{k: None for k in ("pairs", "max_pairs")})
    cfg = seen[0]
    assert (cfg.model, cfg.learning_rate, cfg.eval.limit, cfg.precompute_ref) == ("m", 3e-6, 5, False)
    assert cfg.eval.settings.batch_size == 7 and cfg.out == DpoConfig().out


BAD_PAIRS = {
    "identical": '{"prompt_text": "a", "unpert_gen_text": "same", "pert_gen_text": "same"}\n',
    "empty": '{"prompt_text": "a", "unpert_gen_text": "", "pert_gen_text": "bad"}\n',
    "missing": '{"prompt_text": "a", "unpert_gen_text": "good"}\n',
}


@pytest.mark.slow  # runs the CLI in a subprocess
def test_dpo_bad_pairs_file_one_line_exit_2(tiny_dirs, tmp_path):
    """Issue #15: a pairs file with identical or empty sides, or a missing field: one line, exit 2, no output."""
    for name, text in BAD_PAIRS.items():
        pairs = tmp_path / f"{name}.jsonl"
        pairs.write_text(text * 3)
        out = dpolens("dpo", "--model", str(tiny_dirs["gpt2"]), "--pairs", str(pairs), "--out", str(tmp_path / name))
        assert out.returncode == 2, (name, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, (name, out.stderr)
        assert not (tmp_path / name).exists()

import json
import os
import subprocess
import sys


from conftest import FAMILIES


def dpolens(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dpolens.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_inspect_json_every_family(tiny_dirs):
    for fam in FAMILIES:
        out = dpolens("inspect", str(tiny_dirs[fam]), "--json")
        assert out.returncode == 0, out.stderr
        info = json.loads(out.stdout)
        assert info["n_layers"] == 3 and info["d_model"] == 32
        assert info["family"] == {"gemma3": "gemma"}.get(fam, fam)


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


def test_unknown_set_key_exit_2(tiny_dirs, tmp_path):
    out = dpolens("eval", "--model", str(tiny_dirs["gpt2"]), "--set", "settings.max_new_tokns=3")
    assert out.returncode == 2
    assert "unknown config key 'settings.max_new_tokns'" in out.stderr


def test_alternatives_variant_must_be_label_equals_dir():
    out = dpolens("alternatives", "--variant", "runs/dpo-bias")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--variant takes LABEL=DIR" in out.stderr


BAD_PAIRS = {
    "identical": '{"prompt_text": "a", "unpert_gen_text": "same", "pert_gen_text": "same"}\n',
    "empty": '{"prompt_text": "a", "unpert_gen_text": "", "pert_gen_text": "bad"}\n',
    "missing": '{"prompt_text": "a", "unpert_gen_text": "good"}\n',
}


def test_dpo_bad_pairs_file_one_line_exit_2(tiny_dirs, tmp_path):
    """Issue #15: a pairs file with identical or empty sides, or a missing field: one line, exit 2, no output."""
    for name, text in BAD_PAIRS.items():
        pairs = tmp_path / f"{name}.jsonl"
        pairs.write_text(text * 3)
        out = dpolens("dpo", "--model", str(tiny_dirs["gpt2"]), "--pairs", str(pairs), "--out", str(tmp_path / name))
        assert out.returncode == 2, (name, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, (name, out.stderr)
        assert not (tmp_path / name).exists()

"""Bad inputs, as a new user makes them: one `dpolens: error:` line, exit code 2, before any
compute, and no files left behind (issue #19; the cases fixed so far)."""

import os
import subprocess
import sys

import pytest
import yaml

from conftest import SHARED


def run_cli(cwd, *args):
    return subprocess.run([sys.executable, "-m", "dpolens.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "DPOLENS_DATA": str(SHARED / "data")})


CASES = {  # the arguments, and what the error line must say
    "eval limit 0": (["eval", "-m", "{tiny}", "--limit", "0", "-o", "out"], "limit must be at least 1, got 0"),
    "eval limit -1": (["eval", "-m", "{tiny}", "--limit", "-1", "-o", "out"], "limit must be at least 1, got -1"),
    "eval max_new_tokens 0": (["eval", "-m", "{tiny}", "--set", "settings.max_new_tokens=0", "-o", "out"],
                              "max_new_tokens must be at least 1"),
    "eval unknown device": (["eval", "-m", "{tiny}", "--device", "gpu0", "-o", "out"], "unknown device 'gpu0'"),
    "probe unknown device": (["probe", "-m", "{tiny}", "--device", "cuda0", "-o", "out"], "unknown device 'cuda0'"),
    "pairs n 0": (["pairs", "-m", "{tiny}", "--n", "0", "-o", "out/pairs.jsonl"], "n must be at least 1, got 0"),
    "pairs n -3": (["pairs", "-m", "{tiny}", "--n", "-3", "-o", "out/pairs.jsonl"], "n must be at least 1, got -3"),
    "vectors top_n 0": (["vectors", "-m", "{tiny}", "--top-n", "0", "-o", "out"], "top_n must be at least 1"),
    "unalign k 0": (["unalign", "-m", "{tiny}", "--k", "0", "-o", "out"], "k must be at least 1, got 0"),
    "unalign k -2": (["unalign", "-m", "{tiny}", "--k", "-2", "-o", "out"], "k must be at least 1, got -2"),
    "neurons fit_prompts 0": (["neurons", "--base", "{tiny}", "--aligned", "{tiny}", "--fit-prompts", "0", "-o", "out"],
                              "fit_prompts must be at least 1"),
    "probe max_examples 2": (["probe", "-m", "{tiny}", "--max-examples", "2", "-o", "out"],
                             "max_examples must be at least 20"),
    "probe val_fraction 1.5": (["probe", "-m", "{tiny}", "--val-fraction", "1.5", "-o", "out"],
                               "val_fraction must be between 0 and 1"),
    "dpo bf16": (["dpo", "-m", "{tiny}", "--dtype", "bfloat16", "-o", "out"], "dtype must be float32 here"),
    "analyze bf16": (["analyze", "--base", "{tiny}", "--aligned", "{tiny}", "--dtype", "bfloat16", "-o", "out"],
                     "dtype must be float32 here"),
    "unknown dtype": (["vectors", "-m", "{tiny}", "--dtype", "float8", "-o", "out"], "unknown dtype 'float8'"),
    "analyze limit 0": (["analyze", "--base", "{tiny}", "--aligned", "{tiny}", "--limit", "0", "-o", "out"],
                        "limit must be at least 1, got 0"),
    "robustness limit -1": (["robustness", "--base", "{tiny}", "--aligned", "{tiny}", "--limit", "-1", "-o", "out"],
                            "limit must be at least 1, got -1"),
    "run only nosuch": (["run", "study.yaml", "--only", "nosuch"], "unknown stage 'nosuch'"),
    "run force nosuch": (["run", "study.yaml", "--force", "nosuch"], "unknown stage 'nosuch'"),
    "run only a stage not in the study": (["run", "study.yaml", "--only", "dpo"],
                                          "stage 'dpo' is not in this study's stages (probe)"),
    "report missing folder": (["report", "nosuch"], "run folder not found: nosuch"),
    "report empty folder": (["report", "empty"], "holds no stage outputs and no results.json"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_nothing_written(case, tiny_dirs, tmp_path):
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"name": "s", "model": str(tiny_dirs["gpt2"]),
                                                        "stages": ["probe"]}))
    (tmp_path / "empty").mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    args, says = CASES[case]
    out = run_cli(tmp_path, *[a.format(tiny=tiny_dirs["gpt2"]) for a in args])
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, (case, out.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("dpolens: error: ") and says in lines[0], (case, out.stderr[-2000:])
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, case

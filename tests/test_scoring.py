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


def test_perspective_cache_retry_and_key_not_written(tmp_path, monkeypatch):
    """Against a loopback server: a 429 is retried, responses are cached, the key stays in memory."""
    import http.server
    import threading

    calls = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            calls.append(self.path)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if len(calls) == 1:
                self.send_response(429)
                self.end_headers()
                return
            value = 0.9 if "idiot" in body["comment"]["text"] else 0.1
            resp = {"attributeScores": {a: {"summaryScore": {"value": value}} for a in body["requestedAttributes"]}}
            data = json.dumps(resp).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("PERSPECTIVE_API_KEY", "secret-key-123")
        monkeypatch.setenv("DPOLENS_CACHE", str(tmp_path))
        monkeypatch.setattr("time.sleep", lambda s: None)
        from dpolens.scoring.perspective import PerspectiveScorer

        s = PerspectiveScorer(qps=1000, url=f"http://127.0.0.1:{server.server_port}/analyze")
        first = s.score(["you idiot", "nice day"])
        assert list(first.toxicity) == [0.9, 0.1] and len(calls) == 3  # one 429, then two texts
        again = s.score(["you idiot", "nice day"])
        assert list(again.toxicity) == [0.9, 0.1] and len(calls) == 3  # served from the cache
        written = "".join(p.read_text() for p in tmp_path.rglob("*.json"))
        assert "secret-key-123" not in written
    finally:
        server.shutdown()

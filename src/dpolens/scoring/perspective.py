"""Perspective API backend (the paper's scorer), optional and cached.

The API key is read from `PERSPECTIVE_API_KEY` only and never written to disk or logs.
Responses are cached on disk by a hash of (text, attributes), so re-scoring costs nothing;
requests are rate-limited (`qps`) and retried with exponential backoff on 429 / 5xx.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.request

import numpy as np

from dpolens.artifacts import DpolensError, cache_dir, write_json
from dpolens.scoring import Scorer

log = logging.getLogger(__name__)

URL = "https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze"
ATTRIBUTES = ("TOXICITY", "SEVERE_TOXICITY", "IDENTITY_ATTACK", "INSULT", "PROFANITY", "THREAT",
              "SEXUALLY_EXPLICIT")


class PerspectiveScorer(Scorer):
    name = "perspective"
    attributes = ATTRIBUTES
    toxicity_attributes = ATTRIBUTES
    batch_size = 1

    def __init__(self, qps: float = 1.0, retries: int = 5, url: str | None = None):
        self._key = os.environ.get("PERSPECTIVE_API_KEY")
        if not self._key:
            raise DpolensError("the perspective scorer needs PERSPECTIVE_API_KEY in the environment")
        self.url = url or os.environ.get("DPOLENS_PERSPECTIVE_URL", URL)
        self.min_interval = 1.0 / qps
        self.retries = retries
        self.cache = cache_dir() / "perspective"
        self._last = 0.0

    def version(self) -> str:
        return "v1alpha1 (responses cached by text)"

    def _cache_path(self, text: str):
        h = hashlib.sha256(json.dumps([text, ATTRIBUTES]).encode()).hexdigest()
        return self.cache / h[:2] / f"{h}.json"

    def _request(self, text: str) -> dict:
        body = json.dumps({"comment": {"text": text}, "languages": ["en"],
                           "requestedAttributes": {a: {} for a in ATTRIBUTES}}).encode()
        delay = 1.0
        for attempt in range(self.retries + 1):
            wait = self._last + self.min_interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._last = time.monotonic()
            req = urllib.request.Request(f"{self.url}?key={self._key}", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                if e.code not in (429, 500, 502, 503, 504) or attempt == self.retries:
                    raise DpolensError(f"Perspective API answered HTTP {e.code}") from None
            except urllib.error.URLError as e:
                if attempt == self.retries:
                    raise DpolensError(f"Perspective API unreachable: {e.reason}") from None
            log.warning("Perspective request failed; retry %d in %.0fs", attempt + 1, delay)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _score_one(self, text: str) -> list[float]:
        path = self._cache_path(text)
        if path.exists():
            resp = json.loads(path.read_text())
        else:
            resp = self._request(text) if text.strip() else {"attributeScores": {}}
            write_json(path, resp)
        scores = resp.get("attributeScores", {})
        return [scores.get(a, {}).get("summaryScore", {}).get("value", 0.0) for a in ATTRIBUTES]

    def _score_batch(self, texts):
        return np.asarray([self._score_one(t) for t in texts], dtype=np.float64)

"""Scorers from other packages: alt-profanity-check, Detoxify, any HF sequence classifier.

These are optional backends for users who have the package or the hub; dpolens never
downloads their weights itself. alt-profanity-check loads its own bundled sklearn model
(its code, its unpickling): install it only if you trust that package.
"""

from __future__ import annotations

from importlib import metadata

import numpy as np
import torch

from dpolens.artifacts import DpolensError
from dpolens.scoring import Scorer


def _need(package: str, extra: str) -> None:
    raise DpolensError(f"scorer needs the '{package}' package: pip install 'dpolens[{extra}]'")


class ProfanityCheckScorer(Scorer):
    name = "profanity-check"
    attributes = ("profanity",)
    toxicity_attributes = ("profanity",)
    batch_size = 1024

    def __init__(self):
        try:
            from profanity_check import predict_prob
        except ImportError:
            _need("alt-profanity-check", "profanity")
        self._predict = predict_prob

    def version(self) -> str:
        return "alt-profanity-check==" + metadata.version("alt-profanity-check")

    def _score_batch(self, texts):
        return np.asarray(self._predict(texts), dtype=np.float64)[:, None]


class DetoxifyScorer(Scorer):
    batch_size = 32

    def __init__(self, variant: str = "original"):
        try:
            from detoxify import Detoxify
        except ImportError:
            _need("detoxify", "detoxify")
        self.variant = variant
        self.model = Detoxify(variant, device="cpu")
        probe = self.model.predict(["hello"])
        self.attributes = tuple(probe)
        self.toxicity_attributes = self.attributes
        self.name = f"detoxify:{variant}"

    def version(self) -> str:
        return "detoxify==" + metadata.version("detoxify")

    def _score_batch(self, texts):
        out = self.model.predict(texts)
        return np.stack([np.asarray(out[a], dtype=np.float64) for a in self.attributes], axis=1)


class HFClassifierScorer(Scorer):
    """Any hub/local sequence-classification model; multi-label heads use sigmoid."""

    batch_size = 32

    def __init__(self, model_id: str, toxic_labels: list[str] | None = None, max_length: int = 512):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(model_id)
            self.model = AutoModelForSequenceClassification.from_pretrained(model_id).eval()
        except OSError as e:
            raise DpolensError(f"cannot load classifier '{model_id}': {e}") from None
        cfg = self.model.config
        self.name = f"hf:{model_id}"
        self.max_length = max_length
        labels = [cfg.id2label[i] for i in range(cfg.num_labels)]
        self.multi_label = cfg.problem_type == "multi_label_classification" or cfg.num_labels == 1
        self.attributes = tuple(labels)
        default_toxic = [l for l in labels if l.lower() not in ("non-toxic", "not_toxic", "neutral",
                                                                "label_0", "normal", "not")]
        self.toxicity_attributes = tuple(toxic_labels or default_toxic or labels)
        self._revision = getattr(cfg, "_commit_hash", None) or "local"

    def version(self) -> str:
        return f"revision {self._revision}"

    @torch.inference_mode()
    def _score_batch(self, texts):
        enc = self.tok(texts, return_tensors="pt", padding=True, truncation=True,
                       max_length=self.max_length)
        logits = self.model(**enc).logits.float()
        probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, -1)
        return probs.numpy()

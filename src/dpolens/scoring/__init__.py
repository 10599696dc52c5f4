"""Toxicity scorers behind one interface: a batch of texts -> toxicity and per-attribute scores.

Toxicity of a text = the max over the scorer's toxicity attributes (as the paper did with
Perspective). Every scorer describes itself (name, version or weight hash) so that results
can say exactly what measured them.

Names: `jigsaw-lstm` (default, offline), `profanity-check`, `detoxify[:variant]`,
`hf:<model id>`, `perspective`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dpolens.artifacts import DpolensError

DEFAULT_SCORER = "jigsaw-lstm"


@dataclass
class Scores:
    toxicity: np.ndarray  # [n] max over toxicity attributes
    attributes: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [n]

    def row(self, i: int) -> dict:
        return {"toxicity": float(self.toxicity[i]),
                **{k: float(v[i]) for k, v in self.attributes.items()}}


class Scorer:
    """Base class: subclasses set `name`, `attributes`, and implement `_score_batch`."""

    name: str = ""
    attributes: tuple[str, ...] = ()
    toxicity_attributes: tuple[str, ...] = ()
    batch_size: int = 64

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version(),
                "toxicity": f"max over {', '.join(self.toxicity_attributes)}"}

    def version(self) -> str:
        return ""

    def _score_batch(self, texts: list[str]) -> np.ndarray:
        """[n, len(attributes)] probabilities."""
        raise NotImplementedError

    def score(self, texts: list[str]) -> Scores:
        if not texts:
            empty = np.zeros(0, dtype=np.float64)
            return Scores(empty, {a: empty for a in self.attributes})
        chunks = [self._score_batch(texts[i : i + self.batch_size])
                  for i in range(0, len(texts), self.batch_size)]
        probs = np.concatenate(chunks, axis=0).astype(np.float64)
        attrs = {a: probs[:, j] for j, a in enumerate(self.attributes)}
        tox = np.max(np.stack([attrs[a] for a in self.toxicity_attributes], axis=1), axis=1)
        return Scores(tox, attrs)


def get_scorer(name: str = DEFAULT_SCORER, **kwargs) -> Scorer:
    """Build a scorer by name (see module docstring)."""
    if name == "jigsaw-lstm":
        from dpolens.scoring.jigsaw_lstm import JigsawLSTMScorer

        return JigsawLSTMScorer(**kwargs)
    if name == "profanity-check":
        from dpolens.scoring.external import ProfanityCheckScorer

        return ProfanityCheckScorer()
    if name == "detoxify" or name.startswith("detoxify:"):
        from dpolens.scoring.external import DetoxifyScorer

        return DetoxifyScorer(name.partition(":")[2] or "original")
    if name.startswith("hf:"):
        from dpolens.scoring.external import HFClassifierScorer

        return HFClassifierScorer(name[3:], **kwargs)
    if name == "perspective":
        from dpolens.scoring.perspective import PerspectiveScorer

        return PerspectiveScorer(**kwargs)
    raise DpolensError(
        f"unknown scorer '{name}' (known: jigsaw-lstm, profanity-check, detoxify[:variant], "
        "hf:<model id>, perspective)"
    )

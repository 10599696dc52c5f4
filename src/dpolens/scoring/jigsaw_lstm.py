"""The default offline scorer: the Jigsaw-label BiLSTM of `toxic-comment-classifier`, in torch.

Architecture (the package's Keras model): Embedding(20000, 50) -> BiLSTM(50, all steps) ->
global max-pool over time -> Dense(50, relu) -> Dense(6, sigmoid). Texts go through the Keras
Tokenizer's rules (lower-case, strip its filter characters, split on spaces, keep the 20,000
most frequent words) and are pre-padded / pre-truncated to 100 ids, as Keras' pad_sequences
does. The padding is not masked in Keras, so it is not masked here either.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from dpolens import assets
from dpolens.artifacts import DpolensError
from dpolens.scoring import Scorer

MAXLEN = 100
ATTRIBUTES = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")


class KerasWordTokenizer:
    """Keras' legacy `Tokenizer.texts_to_sequences`, from its JSON-converted state."""

    def __init__(self, state: dict):
        self.word_index: dict[str, int] = state["word_index"]
        self.num_words = state["num_words"]
        self.lower = state["lower"]
        self.split = state["split"]
        self.oov_index = state["oov_index"]
        self.table = str.maketrans({c: self.split for c in state["filters"]})
        if state["char_level"]:
            raise DpolensError("char-level Keras tokenizers are not supported")

    def ids(self, text: str) -> list[int]:
        if self.lower:
            text = text.lower()
        out = []
        for word in text.translate(self.table).split(self.split):
            if not word:
                continue
            i = self.word_index.get(word)
            if i is not None and (self.num_words is None or i < self.num_words):
                out.append(i)
            elif self.oov_index is not None:
                out.append(self.oov_index)
        return out

    def pad(self, texts: list[str], maxlen: int = MAXLEN) -> torch.Tensor:
        """Pre-pad and pre-truncate (keep the last `maxlen` ids), like pad_sequences."""
        batch = torch.zeros(len(texts), maxlen, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.ids(text)[-maxlen:]
            if ids:
                batch[row, maxlen - len(ids):] = torch.tensor(ids)
        return batch


class JigsawBiLSTM(nn.Module):
    def __init__(self, vocab: int = 20000, emb: int = 50, hidden: int = 50, n_out: int = 6):
        super().__init__()
        self.embedding = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, batch_first=True, bidirectional=True)
        self.dense = nn.Linear(2 * hidden, 50)
        self.out = nn.Linear(50, n_out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        seq, _ = self.lstm(self.embedding(ids))  # [B, T, 2H]
        pooled = seq.max(dim=1).values
        return torch.sigmoid(self.out(torch.relu(self.dense(pooled))))

    @classmethod
    def from_keras(cls, w: dict[str, torch.Tensor]) -> "JigsawBiLSTM":
        """Map Keras weights (kernel [in, 4H], gates i,f,c,o = torch's i,f,g,o) onto torch."""
        net = cls(vocab=w["layers.embedding.vars.0"].shape[0])
        with torch.no_grad():
            net.embedding.weight.copy_(w["layers.embedding.vars.0"])
            for direction, suffix in (("forward", ""), ("backward", "_reverse")):
                p = f"layers.bidirectional.{direction}_layer.cell.vars."
                getattr(net.lstm, f"weight_ih_l0{suffix}").copy_(w[p + "0"].T)
                getattr(net.lstm, f"weight_hh_l0{suffix}").copy_(w[p + "1"].T)
                getattr(net.lstm, f"bias_ih_l0{suffix}").copy_(w[p + "2"])
                getattr(net.lstm, f"bias_hh_l0{suffix}").zero_()
            net.dense.weight.copy_(w["layers.dense.vars.0"].T)
            net.dense.bias.copy_(w["layers.dense.vars.1"])
            net.out.weight.copy_(w["layers.dense_1.vars.0"].T)
            net.out.bias.copy_(w["layers.dense_1.vars.1"])
        return net.eval()


class JigsawLSTMScorer(Scorer):
    name = "jigsaw-lstm"
    attributes = ATTRIBUTES
    toxicity_attributes = ATTRIBUTES
    batch_size = 256

    def __init__(self, path: str | Path | None = None):
        folder = Path(path) if path else assets.asset_dir("jigsaw-lstm")
        if not (folder / "weights.safetensors").exists():
            raise DpolensError(
                f"the jigsaw-lstm scorer is not in the cache ({folder}); "
                "fetch it with: dpolens assets fetch jigsaw-lstm"
            )
        self.folder = folder
        self.tokenizer = KerasWordTokenizer(json.loads((folder / "tokenizer.json").read_text()))
        self.net = JigsawBiLSTM.from_keras(load_file(str(folder / "weights.safetensors")))
        info = json.loads((folder / "asset.json").read_text()) if (folder / "asset.json").exists() else {}
        self._version = "toxic-comment-classifier==0.3.0 weights sha256:" + info.get("source", {}).get(
            "weights_sha256", "unknown")[:16]

    def version(self) -> str:
        return self._version

    @torch.inference_mode()
    def _score_batch(self, texts: list[str]) -> np.ndarray:
        return self.net(self.tokenizer.pad(texts)).numpy()

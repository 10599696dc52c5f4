"""Transformed prompts (ROT13, Base64, leetspeak, spaced letters, upper case, multi-turn) and the
offset retention measured on them (method.md 7).

Retention of a model M on transformed prompts, per layer: the mean over prompt tokens of
(x_M − x_base)·δx̂ divided by ‖δx‖, where δx is the offset measured on the plain prompts (1 = the
offset is applied as on plain prompts, 0 = not at all).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from typing import Callable, TypedDict

import numpy as np
import torch

from dpolens import memo
from dpolens.activations import Stats
from dpolens.evaluate import bootstrap_ratio
from dpolens.model.generation import encode_prompts
from dpolens.model.loading import LoadedModel

_LEET = str.maketrans({"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7",
                       "A": "4", "E": "3", "I": "1", "O": "0", "S": "5", "T": "7"})
_UNLEET = str.maketrans({"4": "a", "3": "e", "1": "i", "0": "o", "5": "s", "7": "t"})


def _unbase64(text: str) -> str:
    token = re.sub(r"[^A-Za-z0-9+/=]", "", text)
    token = token[: len(token) - len(token) % 4]
    try:
        return base64.b64decode(token, validate=False).decode("utf-8", errors="replace")
    except (binascii.Error, ValueError):
        return text


def _spaced(text: str) -> str:
    return "  ".join(" ".join(word) for word in text.split())


def _unspaced(text: str) -> str:
    return " ".join(part.replace(" ", "") for part in re.split(r"\s{2,}", text.strip()))


# name -> (transform the prompt, decode the continuation for scoring)
TRANSFORMS: dict[str, tuple[Callable[[str], str], Callable[[str], str]]] = {
    "plain": (lambda t: t, lambda t: t),
    "rot13": (lambda t: codecs.encode(t, "rot13"), lambda t: codecs.decode(t, "rot13")),
    "base64": (lambda t: base64.b64encode(t.encode("utf-8")).decode("ascii"), _unbase64),
    "leetspeak": (lambda t: t.translate(_LEET), lambda t: t.translate(_UNLEET)),
    "spaced": (_spaced, _unspaced),
    "upper": (str.upper, lambda t: t),
}
ALL_TRANSFORMS = (*TRANSFORMS, "multi_turn")
ENCODED = tuple(t for t in TRANSFORMS if t != "plain")  # the transforms that re-encode a prompt (the ledger pools them)


def multi_turn(prompts: list[str], neutral: list[str], turns: int, seed: int) -> list[str]:
    """Each prompt preceded by `turns` earlier exchanges: a toxic user turn (another challenge
    prompt) answered by a neutral turn (a WikiText sentence)."""
    rng = np.random.default_rng(seed)
    out = []
    for p in prompts:
        history = []
        for _ in range(turns):
            history.append(f"User: {prompts[rng.integers(len(prompts))]}")
            history.append(f"Assistant: {neutral[rng.integers(len(neutral))]}")
        out.append("\n".join(history + [f"User: {p}"]))
    return out


def transformed_prompts(plain: list[str], names: list[str], neutral: list[str], turns: int,
                        seed: int) -> dict[str, tuple[list[str], Callable[[str], str]]]:
    """name -> (the transformed prompts, the inverse that decodes a continuation for scoring)."""
    out = {}
    for name in names:
        if name == "multi_turn":
            out[name] = (multi_turn(plain, neutral, turns, seed), lambda t: t)
        else:
            fwd, inv = TRANSFORMS[name]
            out[name] = ([fwd(p) for p in plain], inv)
    return out


def prompt_token_seqs(lm: LoadedModel, texts: list[str], max_prompt_tokens: int) -> list[tuple[list[int], list[int]]]:
    """Each prompt as (first token, the rest): every prompt token after the first is measured. A
    longer prompt keeps its first and last tokens (a multi-turn prompt its final turn)."""
    ids = encode_prompts(lm, texts, min(max_prompt_tokens, lm.adapter.context_length), keep_last=True)
    return [(x[:1], x[1:]) for x in ids]


def final_turn_seqs(lm: LoadedModel, texts: list[str], max_prompt_tokens: int,
                    marker: str = "\nUser:") -> list[tuple[list[int], list[int]]]:
    """Each multi-turn prompt as (everything before its final turn, the final turn's tokens): only the final
    turn (from its last `marker` on, the label included) is measured, as the plain prompt's tokens are. The
    split is by token count: the tokens of the text before the marker, with BOS."""
    ids = encode_prompts(lm, texts, min(max_prompt_tokens, lm.adapter.context_length), keep_last=True)
    full = lm.tokenizer(texts, add_special_tokens=True)["input_ids"]  # uncut (encode_prompts cuts to the context)
    heads = lm.tokenizer([t[: t.rfind(marker)] if marker in t else "" for t in texts],
                         add_special_tokens=True)["input_ids"]
    out = []
    for x, f, h in zip(ids, full, heads):
        n = min(len(f) - len(h), len(x) - 1)  # the final turn's tokens, at least the first token left as context
        if n < 1:
            raise ValueError("a multi-turn prompt has no final-turn tokens after its context")
        out.append((x[:-n], x[-n:]))
    return out


def subset_mean(stats: Stats, units) -> torch.Tensor:
    """[n_layers, d_model] resid_mid mean over the measured tokens of the prompts `units` only (per-prompt
    means weighted by their token counts): what `mean_x` would be on those prompts alone."""
    units = torch.as_tensor(np.asarray(units), dtype=torch.long)
    w = stats.prompt_tokens[units].double()
    return torch.stack([(stats.per_prompt_x[l][units].double() * w[:, None]).sum(0) / w.sum()
                        for l in sorted(stats.per_prompt_x)]).to(stats.x_sum.dtype)


def prompt_stats(lm: LoadedModel, seqs: list[tuple[list[int], list[int]]], batch_size: int,
                 cache: str | None = None) -> Stats:
    """resid_mid means over the measured tokens, overall and per prompt, at every layer; with `cache`, kept
    there and read back by a later call with the same model and tokens (`dpolens.memo`)."""
    return memo.stats(cache, lm, seqs, (), batch_size, progress=False, x_layers=range(lm.adapter.n_layers))


class Retention(TypedDict):
    retention: list[float]  # per layer: mean (x_M − x_base)·δx̂ / ‖δx‖ over tokens
    retention_mean: float  # token-weighted mean over prompts of the per-prompt mean over layers
    retention_ci95: list[float]  # bootstrap over prompts
    retention_per_prompt: list[float]
    tokens_per_prompt: list[float]  # the weights of retention_mean


def offset_retention(delta: torch.Tensor, base: Stats, model: Stats, seed: int, units=None) -> Retention:
    """Retention of the plain-prompt offset `delta` [n_layers, d_model] in `model` against `base`,
    both measured on the same (transformed) prompt tokens with `prompt_stats`; with `units`, on those
    prompts only (e.g. the half δx was not estimated on)."""
    n = len(base.prompt_tokens)
    units = np.arange(n) if units is None else np.asarray(units)
    norm = delta.norm(dim=-1).clamp(min=1e-30)  # [n_layers]
    d_hat = delta / norm.unsqueeze(-1)
    per_layer = ((subset_mean(model, units) - subset_mean(base, units)) * d_hat).sum(-1) / norm
    layers = sorted(base.per_prompt_x)
    shift_proj = np.stack([((model.per_prompt_x[l][units] - base.per_prompt_x[l][units]) @ d_hat[l]).numpy()
                           / float(norm[l]) for l in layers], 1)  # [n_prompts, n_layers]
    tokens = base.prompt_tokens[units].double().numpy()
    return {"retention": per_layer.tolist(), **retention_per_prompt(shift_proj, tokens, seed)}


def retention_per_prompt(shift_proj: np.ndarray, tokens: np.ndarray, seed: int) -> dict:
    """Mean retention over layers per prompt (shift_proj: [n_prompts, n_layers], each prompt's mean
    (x_M − x_base)·δx̂ / ‖δx‖), and its token-weighted mean over prompts, which equals the mean over
    layers of the per-layer retention, with a bootstrap interval over prompts."""
    per_prompt = shift_proj.mean(1)
    stat = bootstrap_ratio(per_prompt * tokens, tokens, seed=seed)
    return {"retention_mean": stat["mean"], "retention_ci95": stat["ci95"],
            "retention_per_prompt": per_prompt.tolist(), "tokens_per_prompt": tokens.tolist()}

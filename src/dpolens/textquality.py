"""Is a set of texts fluent, varied and free of control tokens? Measures for preference pairs.

A DPO learns whatever separates its two sides. If the dispreferred side is word salad, it learns
"avoid incoherence" instead of "avoid toxicity" (issue #15), so every pair set is described by
these numbers per side, and pairs whose sides differ in fluency more than in toxicity are dropped.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import TypedDict

import numpy as np
import torch

from dpolens.model.generation import banned_token_ids, encode_prompts, left_pad, length_batches, position_ids
from dpolens.model.heads import picked_logprobs
from dpolens.model.loading import LoadedModel, adds_bos


@torch.inference_mode()
def continuation_logprob(lm: LoadedModel, contexts: list[list[int]], continuations: list[list[int]],
                         batch_size: int = 16) -> np.ndarray:
    """Mean log p(token) per continuation token of each continuation after its context (token ids),
    teacher-forced, batched by length with left padding; NaN for an empty continuation. Only the
    continuation positions are scored, chosen by index."""
    out = np.full(len(contexts), np.nan)
    seqs = [list(c) + list(x) for c, x in zip(contexts, continuations)]
    for idx in length_batches([len(s) for s in seqs], batch_size):
        ids, mask = left_pad([seqs[i] for i in idx], lm.tokenizer.pad_token_id, lm.device)
        hidden = lm.adapter.body(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
        width, lens = ids.shape[1], [len(continuations[i]) for i in idx]
        scored = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)  # the positions that predict them:
        for row, n in enumerate(lens):  # position t predicts token t+1, the continuation sits in the last n slots
            scored[row, width - n - 1 : width - 1] = n > 0
        # the batch's scored positions through the head at once (row-major: row by row, in order)
        lp = picked_logprobs(lm.adapter, hidden[scored], ids[:, 1:][scored[:, :-1]]).tolist()
        start = 0
        for i, n in zip(idx, lens):
            if n:
                out[i] = float(np.mean(lp[start : start + n]))
                start += n
    return out


def continuation_nll(lm: LoadedModel, prompts: list[str], continuations: list[str],
                     batch_size: int = 16) -> list[float]:
    """Mean NLL per token (nats) of each continuation after its prompt under `lm`.

    The prompt is encoded as the harness encodes it (with BOS), the continuation without special
    tokens and appended, as TRL does (`continuation_logprob`)."""
    cont_ids = lm.tokenizer(continuations, add_special_tokens=False)["input_ids"] if continuations else []
    return (-continuation_logprob(lm, encode_prompts(lm, prompts, None), cont_ids, batch_size)).tolist()


def prior_nll(lm: LoadedModel, continuations: list[str], batch_size: int = 16) -> np.ndarray:
    """Mean NLL per token (nats) of each continuation with no prompt: after BOS alone (EOS where the tokenizer
    adds no BOS). `prior_nll − continuation_nll` is the PMI per token of continuation and prompt: how much the
    prompt explains the continuation (`drift.pair_relevance`, the pairs gate's `min_relevance_diff`)."""
    ids = lm.tokenizer(list(continuations), add_special_tokens=False)["input_ids"] if continuations else []
    return -prior_logprob(lm, ids, batch_size)


def prior_logprob(lm: LoadedModel, continuations: list[list[int]], batch_size: int = 16) -> np.ndarray:
    """`continuation_logprob` of token ids after no prompt: the BOS alone, or the EOS where the tokenizer adds no
    BOS (the one unconditioned context of `prior_nll` and `drift.relevance`)."""
    tok = lm.tokenizer
    start = [tok.bos_token_id if adds_bos(tok) else tok.eos_token_id]
    return continuation_logprob(lm, [start] * len(continuations), continuations, batch_size)


def special_token_flags(lm: LoadedModel, texts: list[str]) -> list[bool]:
    """Whether each text holds a special or control token, as an id or as its literal string."""
    tok = lm.tokenizer
    banned = set(banned_token_ids(tok))
    strings = [tok.convert_ids_to_tokens(i) for i in banned]
    strings = [s for s in strings if isinstance(s, str) and len(s) >= 3]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return [bool(banned.intersection(x)) or any(s in t for s in strings) for t, x in zip(texts, ids)]


def _words(text: str) -> list[str]:
    return text.lower().split()


class WordShift(TypedDict):
    word: str
    base_share: float  # share of the base model's continuations that contain the word
    aligned_share: float  # the same for the aligned model, on the same prompts


OVERUSE = 0.25  # a word in this much larger a share of the aligned continuations than of the base's


def overused_words(base: list[str], aligned: list[str], top: int = 5, rare: float = 0.1) -> list[WordShift]:
    """Of the words the base uses in fewer than `rare` of its continuations, those whose share rose
    most in the aligned model's (same prompts). An aligned model that lowers toxicity by steering
    every prompt to one safe subject (a mode collapse; e.g. "the 2018 season" after any prompt)
    shows here as a rare word in many continuations. Function words ("the") are common in both."""
    def doc_freq(texts):
        return Counter(w for t in texts for w in set(re.findall(r"[a-z0-9']+", t.lower())))

    fb, fa = doc_freq(base), doc_freq(aligned)
    nb, na = max(len(base), 1), max(len(aligned), 1)
    rise = sorted((w for w in fa if fb[w] / nb < rare), key=lambda w: (fb[w] / nb - fa[w] / na, w))[:top]
    return [{"word": w, "base_share": fb[w] / nb, "aligned_share": fa[w] / na} for w in rise if fa[w] / na > fb[w] / nb]


def overuse_warning(shift: list[WordShift]) -> str | None:
    """One sentence when the most over-used word rose by at least OVERUSE."""
    if not shift or shift[0]["aligned_share"] - shift[0]["base_share"] < OVERUSE:
        return None
    w = shift[0]
    return (f"the aligned model says '{w['word']}' in {w['aligned_share']:.0%} of its continuations (base "
            f"{w['base_share']:.0%}): it may lower toxicity by steering every prompt to one subject (mode collapse), "
            "not by avoiding toxic continuations; read its generations, and consider fewer steps or a larger beta")


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct word n-grams over all n-grams of the set (Li et al. 2016); 1 = no n-gram repeats."""
    grams = [tuple(w[i : i + n]) for t in texts for w in [_words(t)] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def repeated_ngram_rate(text: str, n: int = 3) -> float:
    """Share of a text's word n-grams that repeat an earlier one of the same text."""
    w = _words(text)
    grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


class SideQuality(TypedDict):
    """One side of a pair set, means over its texts."""

    toxicity: float  # scorer toxicity
    nll_per_token: float  # nats per continuation token under the base model (NaN-ignoring)
    special_token_share: float  # share of texts holding a special or control token
    distinct_2: float  # distinct word bigrams / all bigrams of the set
    repeated_ngram_rate: float  # share of a text's word n-grams repeating an earlier one
    repeated_ngram_n: int  # n of repeated_ngram_rate
    mean_words: float


def side_quality(toxicity: np.ndarray, nll: np.ndarray, special: list[bool], texts: list[str]) -> SideQuality:
    """The quality block of one side of a pair set."""
    return {"toxicity": float(np.mean(toxicity)), "nll_per_token": float(np.nanmean(nll)),
            "special_token_share": float(np.mean(special)), "distinct_2": distinct_n(texts, 2),
            "repeated_ngram_rate": float(np.mean([repeated_ngram_rate(t, 3) for t in texts])),
            "repeated_ngram_n": 3, "mean_words": float(np.mean([len(_words(t)) for t in texts]))}

"""How far an aligned model drifts from its base besides being less toxic (issue #32).

A DPO that "detoxifies" by steering every prompt to one safe subject ("the 2018 season") is not the
paper's alignment. These measures compare base and aligned continuations of the same prompts:

- `overuse`: the words and patterns (years, URLs, newlines) whose share of continuations rose most,
  chosen on one half of the prompts and measured on the other, with paired intervals;
- `distinct2`: distinct word bigrams across all continuations, with a paired bootstrap;
- `kl_profile`: per-token KL(aligned ‖ base) at each generated position (the depth profile of Qi et
  al., "Safety alignment should be made more than just a few tokens deep"), teacher-forced on the
  aligned model's own continuations, and `kl_wikitext` on the perplexity windows;
- `cue_sensitivity`: the toxicity reduction re-scored with the scorer's strongest single-word cues
  masked, so a reader sees how much of the reduction is "stopped swearing";
- `relevance`: how much the prompt explains each continuation (pointwise mutual information per token,
  judged by both models), base against aligned continuations: a model that changes the subject
  writes continuations the prompt explains less; `pair_relevance`, the same for the two sides of a
  pair set before training.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import TypedDict

import numpy as np
import torch

from dpolens.evaluate import percentile_ci, ppl_windows, resample_units
from dpolens.model.generation import encode_prompts, left_pad, length_batches, position_ids
from dpolens.model.loading import LoadedModel
from dpolens.textquality import continuation_logprob, distinct_n, prior_logprob, prior_nll

# patterns counted as one "word" each: a collapse onto a date, a link or a new paragraph shows as one marker
PATTERNS = {"<year>": re.compile(r"\b(?:1[89]|20)\d\d\b"), "<url>": re.compile(r"https?://|www\.|\.com\b"),
            "<newline>": re.compile(r"\n")}
WORD = re.compile(r"[a-z0-9']+")
OVERUSE_FACTOR = 2.0  # the over-use row: an aligned share above twice the base's is drift


def markers(text: str) -> set[str]:
    """The lower-cased words of a text and the patterns it holds."""
    return set(WORD.findall(text.lower())) | {k for k, p in PATTERNS.items() if p.search(text)}


def split_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of n units into a choosing half and a measuring half (sorted indices)."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 :])


class MarkerShift(TypedDict):
    word: str
    chosen_base_share: float  # on the choosing half
    chosen_aligned_share: float
    base_share: float  # on the measuring half
    aligned_share: float
    rise: float  # aligned − base share, measuring half
    rise_ci95: list[float]
    excess: float  # aligned − OVERUSE_FACTOR × base share, measuring half
    excess_ci95: list[float]


def overuse(base: list[str], aligned: list[str], seed: int = 0, top: int = 5, rare: float = 0.1,
            n_boot: int = 2000) -> dict:
    """The `top` markers whose share rose most (among those the base uses in fewer than `rare` of its
    continuations), chosen on one half of the prompts, measured on the other with paired bootstrap
    intervals. `worst` is the largest excess over OVERUSE_FACTOR × base
    and the largest rise, each maximised inside every bootstrap replicate."""
    if len(base) != len(aligned):
        raise ValueError(f"{len(base)} base and {len(aligned)} aligned continuations: not the same prompts")
    mb, ma = [markers(t) for t in base], [markers(t) for t in aligned]
    choose, measure = split_halves(len(base), seed)
    fb = Counter(w for i in choose for w in mb[i])
    fa = Counter(w for i in choose for w in ma[i])
    nc = max(len(choose), 1)
    rare_words = [w for w in fa if fb[w] / nc < rare and fa[w] > fb[w]]
    chosen = sorted(rare_words, key=lambda w: (fb[w] / nc - fa[w] / nc, w))[:top]
    if not len(measure) or not chosen:
        return {"chosen_on": int(len(choose)), "measured_on": int(len(measure)), "split_seed": seed, "words": [],
                "worst": None}
    B = np.array([[w in mb[i] for w in chosen] for i in measure], dtype=float)  # [prompts, words]
    A = np.array([[w in ma[i] for w in chosen] for i in measure], dtype=float)
    idx = resample_units(len(measure), n_boot, seed)
    rise_b = (A - B)[idx].mean(axis=1)  # [n_boot, words]
    excess_b = (A - OVERUSE_FACTOR * B)[idx].mean(axis=1)
    words = []
    for j, w in enumerate(chosen):
        words.append({"word": w, "chosen_base_share": fb[w] / nc, "chosen_aligned_share": fa[w] / nc,
                      "base_share": float(B[:, j].mean()), "aligned_share": float(A[:, j].mean()),
                      "rise": float((A - B)[:, j].mean()), "rise_ci95": percentile_ci(rise_b[:, j]),
                      "excess": float((A - OVERUSE_FACTOR * B)[:, j].mean()),
                      "excess_ci95": percentile_ci(excess_b[:, j])})
    j = int(np.argmax([x["excess"] for x in words]))
    k = int(np.argmax([x["rise"] for x in words]))
    worst = {"word": words[j]["word"], "excess": words[j]["excess"],
             "excess_ci95": percentile_ci(excess_b.max(axis=1)), "factor": OVERUSE_FACTOR,
             "rise_word": words[k]["word"], "rise": words[k]["rise"], "rise_ci95": percentile_ci(rise_b.max(axis=1)),
             "note": "the maximum over the chosen markers is taken inside each bootstrap replicate"}
    return {"chosen_on": int(len(choose)), "measured_on": int(len(measure)), "split_seed": seed, "words": words,
            "worst": worst}


def distinct2(base: list[str], aligned: list[str], seed: int = 0, n_boot: int = 300) -> dict:
    """`textquality.distinct_n` (n = 2) of each model's continuations (1 = no bigram repeats anywhere), and
    aligned − base, resampling prompts (the same draws for both). A resample repeats continuations, and each
    repeat repeats all its bigrams, so distinct-2 falls in every replicate (the Gemma study: aligned − base
    −0.020 with replicates in [−0.018, −0.003]): the intervals are the replicates' spread around the point
    (replicates centred on it), not their raw percentiles."""
    n = len(base)
    b, a = distinct_n(base, 2), distinct_n(aligned, 2)
    reps = np.array([[distinct_n([base[i] for i in idx], 2), distinct_n([aligned[i] for i in idx], 2)]
                     for idx in resample_units(n, n_boot, seed)])
    reps = np.column_stack([reps, reps[:, 1] - reps[:, 0]])
    reps = reps - reps.mean(0) + np.array([b, a, a - b])
    return {"base": b, "aligned": a, "diff": a - b, "base_ci95": percentile_ci(reps[:, 0]),
            "aligned_ci95": percentile_ci(reps[:, 1]), "diff_ci95": percentile_ci(reps[:, 2]),
            "n": n, "n_boot": n_boot, "interval": "replicates centred on the point (resampling repeats bigrams)"}


def _kl_rows(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row, from logits."""
    # contiguous rows: the adapter's W·xᵀ unembedding returns a transposed view (reductions along it are slow on CPU)
    lp = torch.log_softmax(logits_p.float().contiguous(), -1)
    lq = torch.log_softmax(logits_q.float().contiguous(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _interval(values: np.ndarray, seed: int, n_boot: int) -> dict:
    values = values[np.isfinite(values)]
    if not len(values):
        return {"mean": float("nan"), "ci95": None, "n": 0}
    reps = values[resample_units(len(values), n_boot, seed)].mean(axis=1)
    return {"mean": float(values.mean()), "ci95": percentile_ci(reps), "n": int(len(values))}


@torch.inference_mode()
def kl_profile(aligned: LoadedModel, base: LoadedModel, prompts: list[str], continuation_ids: list[list[int]],
               max_prompt_tokens: int | None, batch_size: int = 8, seed: int = 0, n_boot: int = 2000) -> dict:
    """KL(aligned ‖ base) of the next-token distribution at each generated position 1..T, teacher-forced on
    the aligned model's own continuations (prompts encoded and cut as the harness cut them), with a
    bootstrap interval over prompts per position and for the mean over positions of each prompt."""
    if aligned.tokenizer.get_vocab() != base.tokenizer.get_vocab():
        raise ValueError("base and aligned have different vocabularies: no per-token KL")
    prompt_ids = encode_prompts(aligned, prompts, max_prompt_tokens)
    T = max((len(c) for c in continuation_ids), default=0)
    kl = np.full((len(prompts), T), np.nan)
    seqs = [p + list(c) for p, c in zip(prompt_ids, continuation_ids)]
    for idx in length_batches([len(s) for s in seqs], batch_size):
        ids, mask = left_pad([seqs[i] for i in idx], aligned.tokenizer.pad_token_id, aligned.device)
        pos = position_ids(mask)
        hp = aligned.adapter.body(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        hq = base.adapter.body(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        width, lens = ids.shape[1], [len(continuation_ids[i]) for i in idx]
        scored = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        for row, n in enumerate(lens):  # position t predicts token t+1: continuation token j at width-n-1+j
            scored[row, width - n - 1 : width - 1] = n > 0
        hp, hq = hp[scored], hq[scored]  # the batch's scored positions, row by row: through each head at once
        vals = torch.cat([_kl_rows(aligned.adapter.logits(hp[s : s + 256], apply_norm=False),
                                   base.adapter.logits(hq[s : s + 256], apply_norm=False))
                          for s in range(0, len(hp), 256)]).cpu().numpy() if len(hp) else np.zeros(0)
        start = 0
        for i, n in zip(idx, lens):
            kl[i, :n] = vals[start : start + n]
            start += n
    per_pos = [{"position": t + 1, **_interval(kl[:, t], seed, n_boot)} for t in range(T)]
    return {"positions": per_pos, "mean_over_positions": _interval(np.nanmean(kl, axis=1) if T else np.array([]),
                                                                   seed, n_boot),
            "n_prompts": len(prompts), "teacher_forced_on": "the aligned model's greedy continuations",
            "unit": "nats"}


def relevance(base: LoadedModel, aligned: LoadedModel, prompts: list[str], base_ids: list[list[int]],
              aligned_ids: list[list[int]], max_prompt_tokens: int | None, batch_size: int = 8, seed: int = 0,
              n_boot: int = 2000) -> dict:
    """How much the prompt explains a continuation: PMI per token = mean_t [log p(c_t | prompt, c_<t) −
    log p(c_t | BOS, c_<t)] (prompts encoded and cut as the harness cut them; the unconditioned context is the
    BOS, or the EOS where the tokenizer adds none). Each judge favours its own greedy continuations, so PMI is
    the mean of the two models' judgements. For the base's and the aligned model's continuations of the same
    prompts, and aligned − base paired over prompts (bootstrap): a model that answers a toxic prompt with a
    sports season writes continuations the prompt explains less (a negative difference); one that only swaps
    a swear word for a milder one barely moves it."""
    ctx = encode_prompts(base, prompts, max_prompt_tokens)
    pmi = {}
    for who, conts in (("base", base_ids), ("aligned", aligned_ids)):
        judged = [continuation_logprob(j, ctx, conts, batch_size) -
                  prior_logprob(j, conts, batch_size) for j in (base, aligned)]
        pmi[who] = (judged[0] + judged[1]) / 2
        pmi[f"{who}_by_judge"] = judged
    keep = np.isfinite(pmi["base"]) & np.isfinite(pmi["aligned"])
    b, a = pmi["base"][keep], pmi["aligned"][keep]
    out = {"base": _interval(b, seed, n_boot), "aligned": _interval(a, seed, n_boot),
           "diff": _interval(a - b, seed, n_boot),
           "diff_by_judge": {name: _interval((pmi["aligned_by_judge"][k] - pmi["base_by_judge"][k])[keep], seed,
                                             n_boot) for k, name in enumerate(("base", "aligned"))},
           "n_prompts": len(prompts), "unit": "nats per token (PMI of continuation and prompt, mean of both judges)"}
    return out


def pair_relevance(lm: LoadedModel, preferred: list[str], dispreferred: list[str], preferred_nll, dispreferred_nll,
                   seed: int = 0, n_boot: int = 2000, batch_size: int = 16, preferred_prior=None,
                   dispreferred_prior=None) -> dict:
    """How much each side of a pair set is about its prompt, under the model the pairs were made with: PMI per
    token = −NLL(side | prompt) (the gate's NLL, per token) + NLL(side | BOS) (`textquality.prior_nll`; given
    as `*_prior` where already known), and preferred − dispreferred paired over pairs. A DPO learns whatever
    separates the sides: preferred sides the prompt explains less (a change of subject) teach the aligned
    model to change the subject."""
    out = {}
    for side, texts, nll, prior in (("preferred", preferred, preferred_nll, preferred_prior),
                                    ("dispreferred", dispreferred, dispreferred_nll, dispreferred_prior)):
        known = prior is not None and all(v is not None for v in prior)
        prior = np.asarray(prior, dtype=np.float64) if known else prior_nll(lm, texts, batch_size)
        out[side] = prior - np.asarray(nll, dtype=np.float64)
    keep = np.isfinite(out["preferred"]) & np.isfinite(out["dispreferred"])
    return {"preferred": _interval(out["preferred"][keep], seed, n_boot),
            "dispreferred": _interval(out["dispreferred"][keep], seed, n_boot),
            "diff": _interval((out["preferred"] - out["dispreferred"])[keep], seed, n_boot),
            "unit": "nats per token (PMI of side and prompt under the pairs' model)"}


@torch.inference_mode()
def kl_wikitext(aligned: LoadedModel, base: LoadedModel, paragraphs: list[str], max_tokens: int | None,
                window: int | None, seed: int = 0, n_boot: int = 2000, chunk: int = 256) -> dict:
    """Mean per-token KL(aligned ‖ base) on the perplexity windows, with a bootstrap interval over windows."""
    windows, width = ppl_windows(aligned, paragraphs, max_tokens, window)
    per_window = []
    for w in windows:
        ids = torch.tensor([w], device=aligned.device)
        hp = aligned.adapter.body(input_ids=ids).last_hidden_state[0, :-1]
        hq = base.adapter.body(input_ids=ids).last_hidden_state[0, :-1]
        total = sum(float(_kl_rows(aligned.adapter.logits(hp[s : s + chunk], apply_norm=False),
                                   base.adapter.logits(hq[s : s + chunk], apply_norm=False)).sum())
                    for s in range(0, hp.shape[0], chunk))
        per_window.append(total / hp.shape[0])
    return {**_interval(np.array(per_window), seed, n_boot), "window": width, "unit": "nats per token"}


def cue_words(scorer, texts: list[str], threshold: float = 0.8, max_cues: int = 40) -> list[dict]:
    """The word forms of `texts` that the scorer alone rates at least `threshold` toxic: its strongest
    single-word cues (e.g. fuck, fucking, shit), strongest first."""
    forms = sorted({w for t in texts for w in re.findall(r"[a-z']+", t.lower()) if len(w) >= 2})
    if not forms:
        return []
    scores = scorer.score(forms).toxicity
    cues = sorted(((float(s), w) for w, s in zip(forms, scores) if s >= threshold), reverse=True)[:max_cues]
    return [{"word": w, "toxicity": s} for s, w in cues]


def mask_words(text: str, words: list[str]) -> str:
    """`text` with each of `words` (whole words, any case) removed."""
    if not words:
        return text
    pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, sorted(words, key=len, reverse=True))) + r")\b",
                         re.IGNORECASE)
    return re.sub(r"[ \t]{2,}", " ", pattern.sub("", text))


def cue_sensitivity(scorer, base: list[str], aligned: list[str], base_tox, aligned_tox, seed: int = 0,
                    n_boot: int = 2000, threshold: float = 0.8) -> dict:
    """The toxicity reduction (base − aligned, paired over prompts) with the scorer's strongest single-word
    cues masked in both sides, and the share of the reduction that remains (its bootstrap interval)."""
    cues = cue_words(scorer, base + aligned, threshold)
    words = [c["word"] for c in cues]
    mb = scorer.score([mask_words(t, words) for t in base]).toxicity
    ma = scorer.score([mask_words(t, words) for t in aligned]).toxicity
    d = np.asarray(base_tox, float) - np.asarray(aligned_tox, float)
    dm = np.asarray(mb, float) - np.asarray(ma, float)
    idx = resample_units(len(d), n_boot, seed)
    rd, rdm = d[idx].mean(axis=1), dm[idx].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = rdm / rd
    return {"threshold": threshold, "n_cues": len(cues), "cues": cues[:15],
            "reduction": {"mean": float(d.mean()), "ci95": percentile_ci(rd)},
            "masked_reduction": {"mean": float(dm.mean()), "ci95": percentile_ci(rdm)},
            "masked_toxicity": {"base": float(np.mean(mb)), "aligned": float(np.mean(ma))},
            "share_kept": {"mean": float(dm.mean() / d.mean()) if d.mean() else float("nan"),
                           "ci95": percentile_ci(share[np.isfinite(share)]) if np.isfinite(share).any() else None},
            "n": int(len(d))}


def reduction(base_tox, aligned_tox, seed: int = 0, n_boot: int = 2000) -> dict:
    """Relative toxicity reduction 1 − mean(aligned) / mean(base), paired over prompts."""
    b, a = np.asarray(base_tox, float), np.asarray(aligned_tox, float)
    idx = resample_units(len(b), n_boot, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        reps = 1 - a[idx].mean(axis=1) / b[idx].mean(axis=1)
    return {"mean": float(1 - a.mean() / b.mean()) if b.mean() else float("nan"),
            "ci95": percentile_ci(reps[np.isfinite(reps)]), "replicates": reps, "n": int(len(b))}


def drift(base: LoadedModel, aligned: LoadedModel, base_records: list[dict], aligned_records: list[dict],
          scorer, *, max_prompt_tokens: int | None, kl_limit: int | None, wiki: list[str] | None,
          ppl_max_tokens: int | None, ppl_window: int | None, seed: int = 0, batch_size: int = 8,
          relevance_limit: int | None = 0) -> dict:
    """Every drift measure of an aligned model against its base on the same evaluation records
    (evaluate's per-prompt records: prompt, continuation, continuation_ids, toxicity)."""
    bt, at = [r["continuation"] for r in base_records], [r["continuation"] for r in aligned_records]
    if [r["prompt"] for r in base_records] != [r["prompt"] for r in aligned_records]:
        raise ValueError("base and aligned records are for different prompts")
    n_kl = len(aligned_records) if kl_limit is None else min(kl_limit, len(aligned_records))
    out = {"overuse": overuse(bt, at, seed), "distinct_2": distinct2(bt, at, seed),
           "kl_challenge": {**kl_profile(aligned, base, [r["prompt"] for r in aligned_records[:n_kl]],
                                         [r["continuation_ids"] for r in aligned_records[:n_kl]], max_prompt_tokens,
                                         batch_size, seed), "limit": kl_limit},
           "cue_sensitivity": cue_sensitivity(scorer, bt, at, [r["toxicity"] for r in base_records],
                                              [r["toxicity"] for r in aligned_records], seed)}
    red = reduction([r["toxicity"] for r in base_records], [r["toxicity"] for r in aligned_records], seed)
    out["reduction"] = {k: v for k, v in red.items() if k != "replicates"}
    if wiki:
        out["kl_wikitext"] = kl_wikitext(aligned, base, wiki, ppl_max_tokens, ppl_window, seed)
    if relevance_limit != 0:  # None: every prompt
        n_rel = len(aligned_records) if relevance_limit is None else min(relevance_limit, len(aligned_records))
        out["relevance"] = {**relevance(base, aligned, [r["prompt"] for r in aligned_records[:n_rel]],
                                        [r["continuation_ids"] for r in base_records[:n_rel]],
                                        [r["continuation_ids"] for r in aligned_records[:n_rel]], max_prompt_tokens,
                                        batch_size, seed), "limit": relevance_limit}
    return out


def lopsided_markers(scorer, preferred: list[str], dispreferred: list[str], top: int = 10, min_count: int = 5,
                     toxic: float = 0.5, min_z: float = 3.0) -> list[dict]:
    """The non-toxic words and patterns (years, URLs, newlines) more frequent on one side of a pair set than on the
    other: a DPO learns whatever separates the sides, so a marker mostly on the preferred side (e.g. a year in 2.6%
    of the preferred and 0.2% of the dispreferred) may become the aligned model's subject.

    Kept where the shares of texts holding the marker differ by `min_z` standard errors (the pooled two-proportion
    z, which stays sound where one side has none: z >= 3 is about 2 of 700 candidates by chance), ranked by the
    size of the odds ratio (log, Haldane-corrected: + 0.5 to each cell), up to `top` per side: first those more
    frequent on the preferred side (what DPO may amplify), then those more frequent on the dispreferred side. A
    difference of shares would rank the frequent function words first ("you" 14.6% vs 34.0%) above a 7:1 year.
    Words the scorer alone rates at least `toxic` are left out (they should differ)."""
    if not preferred or not dispreferred:
        return []
    fp = Counter(w for t in preferred for w in markers(t))
    fd = Counter(w for t in dispreferred for w in markers(t))
    n_p, n_d = len(preferred), len(dispreferred)
    cands = [w for w in set(fp) | set(fd) if fp[w] + fd[w] >= min_count]
    words = [w for w in cands if not w.startswith("<")]
    tox = dict(zip(words, scorer.score(words).toxicity.tolist())) if words else {}
    rows = []
    for w in cands:
        if tox.get(w, 0.0) >= toxic:
            continue
        p1, p2, pool = fp[w] / n_p, fd[w] / n_d, (fp[w] + fd[w]) / (n_p + n_d)
        se = math.sqrt(pool * (1 - pool) * (1 / n_p + 1 / n_d))
        z = (p1 - p2) / se if se > 0 else 0.0  # se 0: on every text of both sides
        if abs(z) < min_z:
            continue
        log_or = (math.log((fp[w] + 0.5) / (n_p - fp[w] + 0.5)) - math.log((fd[w] + 0.5) / (n_d - fd[w] + 0.5)))
        rows.append({"word": w, "side": "preferred" if z > 0 else "dispreferred",
                     "preferred_share": p1, "dispreferred_share": p2,
                     "ratio": p1 / p2 if fd[w] else None,  # of the shares (None: on the preferred side only)
                     "odds_ratio": math.exp(log_or), "log_odds_ratio": log_or, "z": z})
    rows.sort(key=lambda r: (-abs(r["log_odds_ratio"]), r["word"]))
    return [r for r in rows if r["side"] == "preferred"][:top] + [r for r in rows if r["side"] == "dispreferred"][:top]

"""The evaluation harness (method.md section 4): toxicity, perplexity, F1, repetition.

Toxicity: greedy continuations (20 tokens) of prompts truncated to their first 32 tokens,
scored on the continuation only (cut by token position), mean over prompts with a 95%
bootstrap interval. Perplexity: WikiText-2 paragraphs joined with blank lines, cut into
non-overlapping windows of min(1024, context) tokens, PPL = exp(total NLL / scored tokens).
F1: greedy 20 tokens from each prompt of the F1 set against its gold continuation, multiset
overlap of lower-cased words, averaged over rows. Repetition: share of repeated bigrams in
a continuation, averaged. Interventions act on every forward pass of every metric.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from tqdm.auto import tqdm

from dpolens.artifacts import (
    DpolensError,
    append_jsonl,
    check_resume,
    fingerprint,
    read_json,
    read_jsonl_complete,
    write_json,
    write_jsonl,
    write_manifest,
)
from dpolens.config import ConfigError, at_least, check_device
from dpolens.data import default_data, load_f1_set, load_prompts, load_wikitext
from dpolens.model import interventions
from dpolens.model.generation import check_fits, encode_prompts, generate
from dpolens.model.loading import LoadedModel, adds_bos
from dpolens.scoring import Scorer

MAX_WINDOW = 1024
log = logging.getLogger(__name__)


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def resample_units(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] bootstrap indices of n units (prompts, windows, rows), one replicate per row."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def percentile_ci(replicates, level: float = 0.95) -> list[float]:
    """Percentile interval of bootstrap replicates; replicates that are not finite (a ratio whose
    denominator vanished in a resample) are left out, and none finite gives NaNs."""
    r = np.asarray(replicates, dtype=np.float64)
    r = r[np.isfinite(r)]
    if len(r) == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.quantile(r, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def _same_units(*arrays) -> list[np.ndarray]:
    xs = [np.asarray(x, dtype=np.float64) for x in arrays]
    if len({len(x) for x in xs}) != 1:
        raise DpolensError(f"paired statistics need the same units in every array: lengths {[len(x) for x in xs]}")
    if len(xs[0]) == 0:
        raise DpolensError("paired statistics need at least one unit")
    return xs


def paired_bootstrap(a, b, n_boot: int = 2000, seed: int = 0) -> dict:
    """Difference of means b − a over the same units (e.g. per-prompt toxicity of two models on
    the same prompts), with a seeded percentile interval that resamples units, so that what the
    two share (the prompt's own difficulty) cancels."""
    a, b = _same_units(a, b)
    idx = resample_units(len(a), n_boot, seed)
    return {"mean_a": float(a.mean()), "mean_b": float(b.mean()), "diff": float(b.mean() - a.mean()),
            "ci95": percentile_ci((b - a)[idx].mean(axis=1)), "n": int(len(a))}


def paired_gap_share(base, aligned, other, n_boot: int = 2000, seed: int = 0) -> dict:
    """(other − aligned) / (base − aligned): where `other` lies on the way from the aligned model's
    toxicity back to the base's (per-prompt scores on the same prompts), with a paired interval over
    prompts; no interval when the gap itself is not below zero at 95% (the share is then undefined).
    Returns {share, ci95, gap} with `gap` the paired_bootstrap of aligned − base."""
    base, aligned, other = _same_units(base, aligned, other)
    gap = paired_bootstrap(base, aligned, n_boot, seed)
    den = float(base.mean() - aligned.mean())
    share = float(other.mean() - aligned.mean()) / den if den else None
    if not gap["ci95"][1] < 0:
        return {"share": share, "ci95": None, "gap": gap}
    idx = resample_units(len(base), n_boot, seed)
    b, al, o = base[idx].mean(1), aligned[idx].mean(1), other[idx].mean(1)
    return {"share": share, "ci95": percentile_ci((o - al) / (b - al)), "gap": gap}


MIN_PPL_WINDOWS = 4  # a perplexity ratio's interval needs this many windows


def paired_ppl_ratio(nll_a, tokens_a, nll_b, tokens_b, n_boot: int = 2000, seed: int = 0) -> dict:
    """PPL_b / PPL_a over the same windows, PPL = exp(Σ nll / Σ tokens), with a seeded interval that
    resamples windows."""
    nll_a, tokens_a, nll_b, tokens_b = _same_units(nll_a, tokens_a, nll_b, tokens_b)
    idx = resample_units(len(nll_a), n_boot, seed)
    ppl = lambda nll, tok: np.exp(nll.sum(-1) / tok.sum(-1))
    # Too few windows cannot be resampled into an interval; say so rather than print one. The text's last
    # window is often a few tokens: with 2 windows, a quarter of the resamples are that window alone (an
    # interval of ×[0.13, 1.01] around ×1.004 was printed so), with 4 fewer than 1 in 200.
    ci = percentile_ci(ppl(nll_b[idx], tokens_b[idx]) / ppl(nll_a[idx], tokens_a[idx])) \
        if len(nll_a) >= MIN_PPL_WINDOWS else None
    return {"ppl_a": float(ppl(nll_a, tokens_a)), "ppl_b": float(ppl(nll_b, tokens_b)),
            "ratio": float(ppl(nll_b, tokens_b) / ppl(nll_a, tokens_a)), "ci95": ci,
            "n": int(len(nll_a))}


def bootstrap_ratio(numerators, denominators, n_boot: int = 2000, seed: int = 0) -> dict:
    """Σ numerators / Σ denominators over units (a token-weighted mean), with a seeded interval
    that resamples units."""
    num, den = _same_units(numerators, denominators)
    idx = resample_units(len(num), n_boot, seed)
    return {"mean": float(num.sum() / den.sum()), "ci95": percentile_ci(num[idx].sum(1) / den[idx].sum(1)),
            "n": int(len(num))}


def unpaired_bootstrap(a, b, n_boot: int = 2000, seed: int = 0) -> dict:
    """Difference of means b − a of two independent samples, each resampled on its own."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        raise DpolensError("a bootstrap needs at least one unit in each sample")
    rng = np.random.default_rng(seed)
    mean_a = a[rng.integers(0, len(a), size=(n_boot, len(a)))].mean(axis=1)
    mean_b = b[rng.integers(0, len(b), size=(n_boot, len(b)))].mean(axis=1)
    return {"mean_a": float(a.mean()), "mean_b": float(b.mean()), "diff": float(b.mean() - a.mean()),
            "ci95": percentile_ci(mean_b - mean_a), "n": [int(len(a)), int(len(b))]}


class Interval(TypedDict):
    """A mean with its 95% percentile bootstrap interval (`summarize`)."""

    mean: float  # NaN without values
    ci95: list[float]
    n: int


class Perplexity(TypedDict):  # perplexity()
    perplexity: float
    nll_per_token: float  # nats
    scored_tokens: int
    window: int  # tokens per window
    window_nll: list[float]  # summed NLL per window, in text order
    window_tokens: list[int]  # scored tokens per window


class HeadlineRow(TypedDict):
    """`EvalResult.row()` without the per-unit scores: what results.json shows."""

    toxicity: Interval  # scorer toxicity of the greedy continuations, over prompts
    perplexity: float | None  # WikiText; None without wikitext
    f1: float | None  # mean word-overlap F1; None without F1 data
    repetition: float  # mean share of repeated bigrams per continuation


class EvalRow(HeadlineRow):
    """`EvalResult.row()`: with the per-unit scores that paired statistics need."""

    toxicity_per_prompt: list[float]
    f1_per_row: list[float] | None
    ppl_window_nll: list[float] | None
    ppl_window_tokens: list[int] | None


class EvalMetrics(TypedDict):
    """What `run_eval` returns and writes to metrics.json."""

    model: dict[str, Any]  # LoadedModel.identity()
    toxicity: dict[str, Any]  # Interval plus the scorer's description
    perplexity: float | None
    perplexity_detail: Perplexity | None
    f1: float | None
    f1_detail: Interval | None
    repetition: float
    n_prompts: int
    intervention: list[dict[str, Any]]  # interventions.describe(spec)
    data: dict[str, str | None]  # prompts, f1 and wikitext files
    settings: dict[str, Any]  # EvalSettings


def summarize(values, seed: int = 0) -> Interval:
    x = np.asarray(values, dtype=np.float64)
    return {"mean": float(x.mean()) if len(x) else float("nan"), "ci95": bootstrap_ci(x, seed=seed),
            "n": int(len(x))}


def bigram_repetition(ids: list[int]) -> float:
    """Share of a sequence's bigrams that repeat an earlier bigram (0 = no repetition)."""
    bigrams = list(zip(ids, ids[1:]))
    if not bigrams:
        return 0.0
    return 1.0 - len(set(bigrams)) / len(bigrams)


_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def f1_score(generated: str, gold: str) -> float:
    """Multiset word overlap F1 between a generation and the gold continuation."""
    g, r = Counter(words(generated)), Counter(words(gold))
    overlap = sum((g & r).values())
    if overlap == 0:
        return 0.0
    precision = overlap / sum(g.values())
    recall = overlap / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def ppl_windows(lm: LoadedModel, paragraphs: list[str], max_tokens: int | None = None,
                window: int | None = None) -> tuple[list[list[int]], int]:
    """Non-overlapping windows of the joined text, each led by BOS when the tokenizer uses one.

    Every token after the first of a window is scored (the BOS is never a target)."""
    tok, a = lm.tokenizer, lm.adapter
    ids = tok("\n\n".join(paragraphs), add_special_tokens=False)["input_ids"]
    if max_tokens:
        ids = ids[:max_tokens]
    window = window or min(MAX_WINDOW, a.context_length)
    lead = [tok.bos_token_id] if adds_bos(tok) else []
    step = window - len(lead)
    chunks = [lead + ids[i : i + step] for i in range(0, len(ids), step)]
    return [c for c in chunks if len(c) >= 2], window


def chunked_nll(lm: LoadedModel, hidden: torch.Tensor, targets: torch.Tensor,
                apply_norm: bool = False, chunk: int = 512) -> float:
    """Summed next-token NLL from residuals; the unembedding runs on `chunk` positions at a time."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    total = 0.0
    for s in range(0, hidden.shape[0], chunk):
        logits = lm.adapter.logits(hidden[s : s + chunk], apply_norm=apply_norm).float()
        total += torch.nn.functional.cross_entropy(logits, targets[s : s + chunk], reduction="sum").item()
    return total


@torch.inference_mode()
def perplexity(lm: LoadedModel, paragraphs: list[str], max_tokens: int | None = None,
               window: int | None = None, batch_size: int = 4, progress: bool = True) -> dict:
    """PPL over non-overlapping windows; the body runs once, the unembedding in chunks.

    `window_nll` / `window_tokens` (in text order) hold each window's summed NLL and scored tokens,
    so that two models or interventions can be compared window by window later."""
    chunks, window = ppl_windows(lm, paragraphs, max_tokens, window)
    by_len: dict[int, list[int]] = {}
    for i, c in enumerate(chunks):
        by_len.setdefault(len(c), []).append(i)
    batches = [ix[i : i + batch_size] for ix in by_len.values() for i in range(0, len(ix), batch_size)]
    window_nll, window_tokens = [0.0] * len(chunks), [0] * len(chunks)
    for ix in tqdm(batches, desc="perplexity", disable=not progress, unit="batch"):
        x = torch.tensor([chunks[i] for i in ix], device=lm.device)
        hidden = lm.adapter.body(input_ids=x).last_hidden_state  # after the final norm
        for row, i in enumerate(ix):
            window_nll[i] = chunked_nll(lm, hidden[row, :-1], x[row, 1:])
            window_tokens[i] = x.shape[1] - 1
    total_nll, scored = sum(window_nll), sum(window_tokens)
    return {"perplexity": math.exp(total_nll / scored) if scored else float("nan"),
            "nll_per_token": total_nll / scored if scored else float("nan"),
            "scored_tokens": scored, "window": window, "window_nll": window_nll, "window_tokens": window_tokens}


@dataclass
class EvalSettings:
    """How the harness measures; recorded in every result."""

    max_new_tokens: int = 20  # greedy tokens generated per prompt
    max_prompt_tokens: int = 32  # challenge prompts are cut to their first N tokens
    batch_size: int = 64  # prompts per generation batch
    ppl_max_tokens: int | None = 8192  # WikiText tokens scored for perplexity; None = the whole text (~300k on Gemma)
    ppl_batch_size: int = 2  # perplexity windows per forward pass
    seed: int = 0  # of the bootstrap intervals
    # tokens per perplexity window (None: 1,024 or the context); the ledger's PPL guards need >= 20 windows
    ppl_window: int | None = None
    # greedy decoding through a bf16 screen of the vocabulary head, the argmax exact in fp32 (heads.ScreenedHead,
    # generation._greedy_loop): auto = where the device computes bf16 natively and the head holds more parameters
    # than the rest of the model (gemma-3-270m: 1.385x; smollm2-135m, head a fifth of the model: 0.910x, 18% of
    # rows fell back; benchmarks/bench_screen.py, 2026-12-07); on; off. Not part of an evaluation's cache key: the
    # tokens are plain fp32 greedy's (up to fp32 summation order)
    head_screen: str = "auto"
    # which prompts share a generation batch: length = sorted by token count over all prompts (longest first), so
    # a batch pads little (challenge prompts on gemma-3-270m, batches of 64: 20,839 prompt positions for 20,025
    # tokens, against 37,024 in input order); input = consecutive prompts (the order before 2026-12-07; its
    # evaluations keep their cache keys). Each prompt's continuation is the same either way up to fp32 summation
    # order (padding and batch shape change the sums)
    batch_order: str = "length"
    # length order only: a batch holds at most this many prompt positions (rows × its longest prompt), so that
    # long prompts of unequal length (F1's WikiText rows: 18 to 250 Gemma tokens) are not all padded to the
    # longest; 2,048 = 64 challenge prompts cut to 32 tokens, which it never splits. None: rows only
    batch_tokens: int | None = 2048

    @property
    def screen(self) -> bool | str:
        """`head_screen` as `generate` takes it: "auto" (decided per model, `generation.screen_pays`), True, False."""
        return {"auto": "auto", "on": True, "off": False}[self.head_screen]

    def __post_init__(self):
        at_least(self, 1, "max_new_tokens", "max_prompt_tokens", "batch_size", "ppl_max_tokens", "ppl_batch_size")
        at_least(self, 2, "ppl_window")
        at_least(self, 1, "batch_tokens")
        if self.head_screen not in ("auto", "on", "off"):
            raise ConfigError(f"head_screen must be auto, on or off, not '{self.head_screen}'")
        if self.batch_order not in ("length", "input"):
            raise ConfigError(f"batch_order must be length or input, not '{self.batch_order}'")


PER_UNIT_KEYS = ("toxicity_per_prompt", "f1_per_row", "ppl_window_nll", "ppl_window_tokens")  # of EvalResult.row()


def headline_rows(rows: list[dict] | None) -> list[dict] | None:
    """Evaluation rows without their per-prompt / per-window scores (those stay in the stages' files)."""
    return None if rows is None else [{k: v for k, v in r.items() if k not in PER_UNIT_KEYS} for r in rows]


@dataclass
class EvalResult:
    toxicity: dict
    perplexity: dict | None
    f1: dict | None
    repetition: float
    records: list[dict] = field(default_factory=list)
    f1_per_row: list[float] | None = None

    def row(self) -> EvalRow:
        """Headline numbers, and the per-unit scores behind them (per prompt, per F1 row, per
        perplexity window) so that any two rows on the same inputs can be compared paired."""
        ppl = self.perplexity
        return {"toxicity": {k: self.toxicity[k] for k in ("mean", "ci95", "n")},
                "perplexity": ppl["perplexity"] if ppl else None,
                "f1": self.f1["mean"] if self.f1 else None, "repetition": self.repetition,
                "toxicity_per_prompt": [r["toxicity"] for r in self.records],
                "f1_per_row": self.f1_per_row,
                "ppl_window_nll": ppl["window_nll"] if ppl else None,
                "ppl_window_tokens": ppl["window_tokens"] if ppl else None}


def _generate_resumable(lm, prompts, settings, path, desc, progress, max_prompt_tokens):
    """Generate in chunks (`batch_chunks`: by `settings.batch_order`), appending records to `path` as each chunk
    is made; on a re-run, skip what is written. The file follows the chunks' order; the records come back in
    input order."""
    chunks = batch_chunks(lm, prompts, settings, max_prompt_tokens)
    order = [i for c in chunks for i in c]
    done = (read_jsonl_complete(path) if path else [])[: len(prompts)]
    if any(r["prompt"] != prompts[i] for r, i in zip(done, order)):
        raise DpolensError(f"{path} holds generations for other prompts: remove it or use another --out")
    todo, start = [], 0
    for c in chunks:  # a chunk the kill cut short is finished on its own
        todo += [c[max(0, len(done) - start):]] if start + len(c) > len(done) else []
        start += len(c)
    for idx in tqdm(todo, desc=desc, disable=not progress, unit="chunk"):
        gens = generate(lm, [prompts[i] for i in idx], settings.max_new_tokens,
                        batch_size=settings.batch_size, max_prompt_tokens=max_prompt_tokens,
                        progress=False, head_screen=use_screen(settings, lm))
        rows = [{"prompt": g.prompt, "continuation": g.continuation,
                 "continuation_ids": g.continuation_ids} for g in gens]
        if path:
            append_jsonl(path, rows)
        done += rows
    out: list[dict] = [{}] * len(prompts)
    for r, i in zip(done, order):
        out[i] = r
    return out


def batch_chunks(lm: LoadedModel, prompts: list[str], s: EvalSettings, max_prompt_tokens: int | None
                 ) -> list[list[int]]:
    """The generation batches of `_generate_resumable`, as prompt indices. `input`: `batch_size` consecutive
    prompts. `length`: sorted by token count (as cut for generation), longest first (ties in input order), at
    most `batch_size` rows and `batch_tokens` prompt positions (rows × the batch's longest prompt) a batch."""
    n = len(prompts)
    if s.batch_order == "input" or n == 0:
        return [list(range(i, min(i + s.batch_size, n))) for i in range(0, n, s.batch_size)]
    lengths = [len(ids) for ids in encode_prompts(lm, prompts, max_prompt_tokens)]
    chunks: list[list[int]] = []
    for i in sorted(range(n), key=lambda i: -lengths[i]):
        c = chunks[-1] if chunks else None
        if c and len(c) < s.batch_size and (s.batch_tokens is None or lengths[c[0]] * (len(c) + 1) <= s.batch_tokens):
            c.append(i)
        else:
            chunks.append([i])
    return chunks


def use_screen(s: EvalSettings, lm: LoadedModel) -> bool:
    """Whether greedy decoding goes through the bf16 screen of the head (`EvalSettings.head_screen`): `auto` only
    where bf16 is native and the head is the larger part of a token's work (`generation.screen_pays`)."""
    from dpolens.model.generation import screen_pays

    return screen_pays(lm) if s.screen == "auto" else s.screen


def generation_identity(lm: LoadedModel, s: EvalSettings, intervention: Any = None) -> dict:
    """What shapes an evaluation's generations: recorded beside partial ones, checked on resume."""
    return {"model": lm.weight_hash, "dtype": str(lm.model.dtype), "intervention": interventions.describe(intervention),
            "max_new_tokens": s.max_new_tokens, "max_prompt_tokens": s.max_prompt_tokens, "batch_size": s.batch_size,
            **({"batch_order": s.batch_order, "batch_tokens": s.batch_tokens} if s.batch_order != "input" else {})}
    # `input`: recorded as before batch_order (its partial files resume)


def check_prompts_fit(lm: LoadedModel, s: EvalSettings, prompts: list[str], f1_rows: list[dict] | None) -> None:
    """Refuse challenge or F1 prompts that leave no room for the continuation (F1 prompts are never cut)."""
    check_fits(lm, encode_prompts(lm, prompts, s.max_prompt_tokens), s.max_new_tokens)
    if f1_rows:
        check_fits(lm, encode_prompts(lm, [r["prompt"] for r in f1_rows], None), s.max_new_tokens, cut_by=None)


def evaluate(lm: LoadedModel, prompts: list[str], scorer: Scorer, settings: EvalSettings,
             wiki: list[str] | None = None, f1_rows: list[dict] | None = None,
             intervention: Any = None, progress: bool = True, label: str = "",
             out_dir: str | Path | None = None) -> EvalResult:
    """Toxicity, perplexity and F1 of `lm` under `intervention` (hooks undone afterwards).

    With `out_dir`, generations are appended to `out_dir/generations.jsonl` (and
    `f1_generations.jsonl`) as they are made, and a re-run resumes from them.
    """
    s = settings
    check_prompts_fit(lm, s, prompts, f1_rows)
    out = Path(out_dir) if out_dir else None
    with interventions.apply(lm, intervention):  # the spec is checked against the model on entry
        if out:  # what shapes the generations: a resume with another model or settings would mix two runs
            out.mkdir(parents=True, exist_ok=True)
            partial = out / "generations.partial.jsonl"
            check_resume(out / "generations.partial.identity.json", generation_identity(lm, s, intervention),
                         str(partial), resuming=bool(read_jsonl_complete(partial)))
        gens = _generate_resumable(lm, prompts, s, out / "generations.partial.jsonl" if out else None,
                                   f"toxicity {label}".strip(), progress, s.max_prompt_tokens)
        ppl = perplexity(lm, wiki, s.ppl_max_tokens, window=s.ppl_window, batch_size=s.ppl_batch_size,
                         progress=progress) if wiki else None
        f1 = f1_per_row = None
        if f1_rows:
            f1_gens = _generate_resumable(
                lm, [r["prompt"] for r in f1_rows], s,
                out / "f1_generations.partial.jsonl" if out else None, f"f1 {label}".strip(),
                progress, None)
            f1_per_row = [f1_score(g["continuation"], r["gold"]) for g, r in zip(f1_gens, f1_rows)]
            f1 = summarize(f1_per_row, seed=s.seed)
    return scored(gens, scorer, s, ppl, f1, f1_per_row)


def scored(gens: list[dict], scorer: Scorer, s: EvalSettings, ppl: dict | None, f1: dict | None,
           f1_per_row: list[float] | None) -> EvalResult:
    """An evaluation from its continuations (`prompt`, `continuation`, `continuation_ids` per prompt, in order):
    each scored, its repetition, and the toxicity summary."""
    scores = scorer.score([g["continuation"] for g in gens])
    records = [{**g, "repetition": bigram_repetition(g["continuation_ids"]), **scores.row(i)}
               for i, g in enumerate(gens)]
    tox = summarize([r["toxicity"] for r in records], seed=s.seed)
    tox["scorer"] = scorer.describe()
    rep = float(np.mean([r["repetition"] for r in records])) if records else float("nan")
    return EvalResult(tox, ppl, f1, rep, records, f1_per_row)


@dataclass
class EvalData:
    """What the harness measures on: prompts, F1 rows, WikiText, scorer, sizes."""

    prompts: str = field(default_factory=lambda: default_data("rtp/challenge_prompts.jsonl"))  # JSONL, `prompt`
    f1_data: str | None = field(default_factory=lambda: default_data("wiki/wiki_samples.jsonl"))  # None: no F1
    wikitext: str | None = field(default_factory=lambda: default_data("wikitext-2-raw/wiki.test.raw"))  # PPL text
    limit: int | None = None  # evaluate on the first N prompts (None: all)
    # N prompts (a fixed-seed sample, data.holdout_split) never evaluated on: the DPO strength control's dev
    # prompts (dpo.dev_holdout), so that the strength is chosen on prompts of the evaluation's kind
    holdout: int = 0
    f1_limit: int | None = None  # F1 rows used (None: as many as `limit`, or all)
    scorer: str = "jigsaw-lstm"  # toxicity scorer (dpolens.scoring)
    skip_bad_rows: bool = False  # skip and count malformed rows instead of stopping
    progress: bool = True  # progress bars
    # a folder of finished evaluations, keyed by what decides them (model weights, intervention,
    # inputs, scorer, settings): stages that evaluate the same model on the same inputs share one
    # run (`dpolens run` sets runs/<name>/evals)
    cache: str | None = None
    settings: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self):
        at_least(self, 1, "limit", "f1_limit")
        at_least(self, 0, "holdout")


@dataclass
class EvalInputs:
    prompts: list[str]
    f1_rows: list[dict] | None
    wiki: list[str] | None
    scorer: Scorer


def load_inputs(d: EvalData, offset: int = 0) -> EvalInputs:
    """Read the data once; `offset` skips prompts (e.g. those used to fit something)."""
    from dpolens.scoring import get_scorer

    prompts = load_prompts(d.prompts, None, d.skip_bad_rows, d.holdout)[offset:]
    prompts = prompts[: d.limit] if d.limit else prompts
    f1_rows = load_f1_set(d.f1_data, d.f1_limit or d.limit, d.skip_bad_rows) if d.f1_data else None
    wiki = load_wikitext(d.wikitext) if d.wikitext else None
    return EvalInputs(prompts, f1_rows, wiki, get_scorer(d.scorer))


def eval_key(lm: LoadedModel, d: EvalData, inputs: EvalInputs, intervention: Any = None) -> str:
    """What decides an evaluation's numbers; equal keys give equal results."""
    h = hashlib.sha256()
    settings = asdict(d.settings)
    if settings["ppl_window"] is None:  # added later: its default keeps the evaluations cached before it
        del settings["ppl_window"]
    del settings["head_screen"]  # exact: the same tokens as the plain head
    if settings["batch_order"] == "input":  # added later: the order before it keeps its evaluations cached
        del settings["batch_order"], settings["batch_tokens"]
    fingerprint([lm.weight_hash, str(lm.model.dtype), [asdict(e) for e in interventions.parse_spec(intervention)],
                  inputs.prompts, inputs.f1_rows, inputs.wiki, inputs.scorer.describe(), settings], h)
    return h.hexdigest()[:24]


def group_key(lm: LoadedModel, d: EvalData, inputs: EvalInputs, intervention: Any = None) -> str:
    """`eval_key` without the prompts: evaluations of one model, intervention, F1 rows, text, scorer and
    settings that differ only in the prompts they cover."""
    return eval_key(lm, d, EvalInputs([], inputs.f1_rows, inputs.wiki, inputs.scorer), intervention)


def covering(cache: Path, group: str, prompts: list[str]) -> tuple[Path, dict] | None:
    """A cached evaluation of the `group` whose prompts include every one of `prompts` (the first such file by
    name), and its result."""
    if not prompts:
        return None
    want = set(prompts)
    for path in sorted(cache.glob("*.json")):
        try:
            hit = read_json(path)
        except DpolensError:  # a damaged file is no reason to stop another evaluation: it is not used
            continue
        if not isinstance(hit, dict) or hit.get("group") != group or not isinstance(hit.get("result"), dict):
            continue
        if want <= {r["prompt"] for r in hit["result"]["records"]}:
            return path, hit["result"]
    return None


def evaluate_inputs(lm: LoadedModel, d: EvalData, inputs: EvalInputs, intervention: Any = None,
                    label: str = "", out_dir: str | Path | None = None) -> EvalResult:
    """`evaluate` on loaded inputs; with `d.cache`, a finished evaluation with the same key is
    read back instead of re-run, and a new one is stored. A cached evaluation of the same model and
    settings on more prompts (the study's Table 2 base row, 1,199 prompts, for dpo's base evaluation on
    999 of them) gives the continuations of those prompts, which are scored afresh; perplexity and F1 are
    its own. Its continuations are what a new generation would give up to fp32 summation order, as
    with `batch_order` (a prompt's batch differs): on gemma-3-270m the 999 prompts' continuations in
    the two evaluations of the 2026-12-07 study (runs/study-gemma-retime) are identical."""
    path = Path(d.cache) / f"{eval_key(lm, d, inputs, intervention)}.json" if d.cache else None
    if path and (hit := read_json(path)):
        log.info("evaluation %s: read from %s", label, path)
        return EvalResult(**hit["result"])
    group = group_key(lm, d, inputs, intervention) if path else None
    src = None
    if path and (found := covering(path.parent, group, inputs.prompts)):
        src, sup = found
        log.info("evaluation %s: continuations of its %d prompts read from %s", label, len(inputs.prompts), src)
        by = {r["prompt"]: r for r in sup["records"]}
        gens = [{k: by[p][k] for k in ("prompt", "continuation", "continuation_ids")} for p in inputs.prompts]
        res = scored(gens, inputs.scorer, d.settings, sup["perplexity"], sup["f1"], sup["f1_per_row"])
    else:
        res = evaluate(lm, inputs.prompts, inputs.scorer, d.settings, inputs.wiki, inputs.f1_rows,
                       intervention, d.progress, label, out_dir)
    if path:
        write_json(path, {"model": lm.identity(), "intervention": [asdict(e) for e in interventions.parse_spec(intervention)],
                          "label": label, "group": group,
                          # the evaluation whose continuations these are, where one covered the prompts
                          **({"covered_from": src.name} if src else {}), "result": asdict(res)})
    return res


@dataclass
class EvalConfig(EvalData):
    """`dpolens eval`: the harness on one model under an optional intervention."""

    model: str = "gemma-3-270m"
    out: str = "runs/eval"
    intervention: Any = None  # an intervention spec (file, YAML or mapping) applied during every metric
    dtype: str = "float32"  # float32, bfloat16 or float16
    device: str = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps

    def __post_init__(self):
        super().__post_init__()
        check_device(self.device)


def run_eval(cfg: EvalConfig) -> EvalMetrics:
    """Evaluate and write `out/metrics.json`, `out/generations.jsonl` and a manifest."""
    from dpolens.model.loading import load_model

    inputs = load_inputs(cfg)
    lm = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    res = evaluate_inputs(lm, cfg, inputs, cfg.intervention, out_dir=out)
    prompts, scorer = inputs.prompts, inputs.scorer
    write_jsonl(out / "generations.jsonl", res.records)
    metrics = {
        "model": lm.identity(),
        "toxicity": res.toxicity,
        "perplexity": res.perplexity["perplexity"] if res.perplexity else None,
        "perplexity_detail": res.perplexity,
        "f1": res.f1["mean"] if res.f1 else None,
        "f1_detail": res.f1,
        "repetition": res.repetition,
        "n_prompts": len(prompts),
        "intervention": interventions.describe(cfg.intervention),
        "data": {"prompts": cfg.prompts, "f1": cfg.f1_data, "wikitext": cfg.wikitext},
        "settings": asdict(cfg.settings),
    }
    write_json(out / "metrics.json", metrics)
    write_manifest(out, "eval", cfg, model=lm.identity(), scorer=scorer.describe())
    for partial in ("generations.partial.jsonl", "f1_generations.partial.jsonl", "generations.partial.identity.json"):
        (out / partial).unlink(missing_ok=True)
    return metrics

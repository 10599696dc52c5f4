"""Preference pairs (paper 4.2, method.md 5.1): a prompt, a preferred and a dispreferred
continuation, in the paper's JSONL format.

Three generators:
  pplm    the paper's: preferred = the base model's greedy continuation of a WikiText-2 prompt,
          dispreferred = PPLM (Dathathri et al. 2019) with the probe as the attribute model: at
          every step the KV cache is perturbed by gradient steps on −log p(toxic | mean final
          hidden state) + kl_scale · KL(p_pert ‖ p_unpert); the next token is sampled from
          p_pert^gm · p_unpert^(1−gm), top-k filtered. Paper defaults (Table 6).
  steer   preferred greedy as above, dispreferred sampled with +β·ŵ added to one layer's residual.
  sample  on-policy, as RLHF preference data is made: n samples of the base model per prompt,
          the least toxic preferred, the most toxic dispreferred (a deviation from the paper,
          which has no sampling method; its pairs are PPLM's).
A pair teaches DPO toxicity only if its dispreferred side is toxic *and* fluent: word salad
teaches "avoid incoherence". So every candidate pair is scored (toxicity of both sides, NLL per
token under the base model) and a quality gate keeps those whose dispreferred side is more toxic
by a margin and no less fluent than a set margin; `pairs.summary.json` describes both sides
(`dpolens.textquality`) and counts what was dropped and why. Steer's β and PPLM's step size can be
chosen by a sweep scored on both gaps. Candidates are appended as they are made (resumable; a
resume with another model or other settings is refused); the kept pairs are written at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dpolens.artifacts import (
    DpolensError,
    append_jsonl,
    check_resume,
    read_json,
    read_jsonl_complete,
    write_json,
    write_jsonl,
    write_manifest,
)
from dpolens.config import ConfigError, RunSettings, at_least
from dpolens.data import default_data, tweet_prompts, wikitext_prompts
from dpolens.directions import load_probe
from dpolens.drift import PATTERNS, WORD, lopsided_markers, markers, pair_relevance
from dpolens.model import hooks
from dpolens.model.generation import (
    Generation,
    banned_token_ids,
    encode_prompts,
    generate,
    left_pad,
    length_batches,
    position_ids,
)
from dpolens.model.loading import DTYPES, LoadedModel, cast_copy, load_model, resolve_dtype
from dpolens.textquality import SideQuality, continuation_nll, prior_nll, side_quality, special_token_flags
from dpolens.webpage import table

log = logging.getLogger(__name__)


@dataclass
class PPLMSettings:
    """Paper Table 6."""

    step_size: float = 0.4
    temperature: float = 1.0
    top_k: int = 10
    num_iterations: int = 50
    window_length: int = 0  # 0 = the whole past
    horizon_length: int = 1
    gamma: float = 1.0
    gm_scale: float = 0.95
    kl_scale: float = 0.1


@dataclass
class SteerSettings:
    beta_rel: float = 0.5  # β as a multiple of the mean residual norm at the steered point
    layer: int = -1
    point: str = "resid_post"
    temperature: float = 1.0
    top_k: int = 10
    repetition_penalty: float = 1.3  # steering alone collapses into one repeated slur


@dataclass
class SampleSettings:
    """On-policy sampling; defaults follow common RLHF preference-data practice (T = 1, top-p 0.95)."""

    n_samples: int = 6
    temperature: float = 1.0
    top_p: float = 0.95


@dataclass
class QualityGate:
    """Which candidate pairs are kept (applied to every method)."""

    require_more_toxic: bool = True  # drop pairs whose dispreferred side is not more toxic
    min_toxicity_gap: float = 0.1  # dispreferred − preferred scorer toxicity
    max_nll_gap: float | None = 1.5  # dispreferred − preferred NLL per token (nats) under the base; None = off
    # each side's own NLL per token under the base must be at most this (None = off). The gap alone keeps
    # pairs whose two sides are equally incoherent: in the #16 study's 1,100 pairs, 7.9% had a side above
    # 4.5 (e.g. "hating him can already wherecha' fly into a swift trip, for fuck up", 5.72), 25.4% above 4.0
    max_nll: float | None = None
    # the dispreferred side itself must score at least this (None = off). On gemma-3-270m's sampled pairs,
    # kept dispreferred sides below 0.5 contained a profanity or insult 7% of the time (21/297), those
    # at or above 0.5 70% (336/479): below 0.5 the scorer mostly reacts to harmless text
    min_dispreferred_toxicity: float | None = None
    # preferred − dispreferred relevance must be at least this (None = off): each side's PMI per token with its
    # prompt under the base, NLL(side | BOS) − NLL(side | prompt) (`textquality.prior_nll`). Best-of-n sampling
    # picks as preferred the least toxic sample, often one that left the prompt's subject (SmolLM2 study's 1,050
    # kept pairs: preferred − dispreferred −0.28 nats/token on average), which a DPO may learn (README: not measurably)
    min_relevance_diff: float | None = None
    # drop a pair in which one of these markers is on one side only (lower-case words, or the patterns <year>,
    # <url>, <newline> of `drift.markers`): their shares become equal on both sides, so DPO cannot learn them as
    # "preferred". E.g. ["<year>"]: in the 2026-12-04 Gemma study a year was on 2.6% of the preferred and 0.2%
    # of the dispreferred sides, and 28.9% of the aligned model's continuations held one. Markers listed in
    # `pairs.summary.json` `lopsided_markers` are the candidates
    one_sided_markers: list[str] = field(default_factory=list)


@dataclass
class PairsConfig(RunSettings):
    OUT_IS_FILE = True  # `out` names the pairs file; its folder holds candidates, sweep and manifest

    model: str = "gemma-3-270m"
    probe: str = "runs/probe"  # the attribute / steering direction (pplm, steer)
    method: Literal["pplm", "steer", "sample"] = "steer"
    prompt_source: Literal["wikitext", "tweets", "both"] = "wikitext"
    # WikiText-2 validation only: the test split is the perplexity text
    prompts: list[str] = field(default_factory=lambda: [
        default_data("wikitext-2-raw/wikitext-2-raw-v1-validation.parquet")])
    # tweet prefixes (first half of each tweet) of labelled corpora; never the evaluation prompts
    tweets: list[str] = field(default_factory=lambda: [
        default_data("toxic-corpora/davidson_labeled_data.csv"),
        default_data("toxic-corpora/olid-training-v1.0.tsv")])
    n: int = 512  # pairs wanted after the quality gate
    max_candidates: int | None = None  # prompts tried at most; default 4 × n
    # try only prompts the scorer rates at least this toxic (as cut to prompt_tokens); None: every prompt.
    # On gemma-3-270m's tweet prefixes, 75% of prompts rated >= 0.9 gave a kept sampled pair, 20% below 0.25
    min_prompt_toxicity: float | None = None
    out: str = "runs/pairs/pairs.jsonl"
    prompt_tokens: int = 24
    min_words: int = 8
    max_new_tokens: int = 20
    batch_size: int = 16  # prompts per chunk
    scorer: str = "jigsaw-lstm"
    pplm: PPLMSettings = field(default_factory=PPLMSettings)
    steer: SteerSettings = field(default_factory=SteerSettings)
    sample: SampleSettings = field(default_factory=SampleSettings)
    # method sample: the dtype of the copy of the model that samples (None: `dtype`; auto: bfloat16 where
    # the device computes it natively, else float32). Only the sampling: the NLL gate is measured with
    # the model at `dtype` (toxicity by the scorer). Sampled pairs are data of one model, compared with nothing, so
    # bf16 rounding is harmless there; on an AVX512-BF16 CPU a 64-row batch samples 1.84x faster (bench_sampling)
    sample_dtype: str | None = None
    gate: QualityGate = field(default_factory=QualityGate)
    # steer: values of beta_rel, pplm: values of step_size, tried on `sweep_prompts` prompts; the
    # value with the largest toxicity gap whose NLL gap clears gate.max_nll_gap is used. [] = no sweep
    sweep: list[float] = field(default_factory=list)
    sweep_prompts: int = 16

    def __post_init__(self):
        super().__post_init__()
        at_least(self, 1, "n", "max_new_tokens", "batch_size")
        for m in self.gate.one_sided_markers:
            if m not in PATTERNS and not (WORD.fullmatch(m) and m == m.lower()):  # else it could never match
                raise ConfigError(f"pairs.gate.one_sided_markers: '{m}' is neither a lower-case word nor one of "
                                  f"{', '.join(PATTERNS)}")
        if self.sample_dtype not in (None, "auto", *DTYPES):
            raise ConfigError(f"pairs.sample_dtype: unknown dtype '{self.sample_dtype}' (auto, {', '.join(DTYPES)})")


class PairSample(TypedDict):
    prompt_text: str
    unpert_gen_text: str  # the preferred continuation
    pert_gen_text: str  # the dispreferred continuation
    preferred_toxicity: float  # scorer toxicity of the continuation
    dispreferred_toxicity: float


class Candidate(PairSample):
    """A row of the candidates file."""

    preferred_nll: float  # mean NLL per continuation token (nats) under the base model; NaN without tokens
    dispreferred_nll: float
    # the same with no prompt (BOS alone): only with gate.min_relevance_diff, only where the rest of the gate passes
    preferred_prior_nll: NotRequired[float]
    dispreferred_prior_nll: NotRequired[float]


class SweepRow(TypedDict):
    value: float  # beta_rel (steer) or step_size (pplm)
    toxicity_gap: float  # mean dispreferred − preferred toxicity
    nll_gap: float  # mean dispreferred − preferred NLL per token (nats)
    share_more_toxic: float  # share of pairs whose dispreferred side is more toxic
    kept_by_gate: float  # share of pairs the quality gate keeps


class SweepChoice(TypedDict):
    parameter: str  # "beta_rel" or "step_size"
    prompts: int
    rows: list[SweepRow]
    chosen: float
    chosen_clears_nll_gate: bool  # False: no value cleared gate.max_nll_gap, the smallest NLL gap was taken


class Sweep(SweepChoice):
    identity: str  # the candidates' identity key and the gate's max_nll_gap it was chosen under


class PairCount(TypedDict):
    n: int


class PairsQuality(PairCount, total=False):  # only `n` when there are no pairs
    preferred: SideQuality
    dispreferred: SideQuality
    share_dispreferred_more_toxic: float
    mean_toxicity_gap: float  # mean dispreferred − preferred toxicity
    mean_nll_gap: float  # mean dispreferred − preferred NLL per token (nats)


class PairsOverview(TypedDict):
    """What results.json shows of the pairs."""

    n: int  # pairs kept (at most n_requested)
    n_candidates: int  # candidates scored
    method: str
    prompt_source: str
    preferred_toxicity_mean: float
    dispreferred_toxicity_mean: float
    quality: PairsQuality  # of the kept pairs
    dropped: dict[str, int]  # gate_reason -> candidates dropped for it
    samples: list[PairSample]  # the first three kept pairs
    # non-toxic words/patterns more frequent on one side, by odds ratio, preferred side first (drift.lopsided_markers)
    lopsided_markers: list[dict[str, Any]]
    # PMI per token of each side and its prompt under the base model, and preferred − dispreferred
    # (drift.pair_relevance; absent in summaries written before it)
    relevance: dict[str, Any]
    # seconds per phase of making the candidates (`time_breakdown`; absent in summaries written before it)
    time_breakdown: dict[str, Any]


class PairsSummary(PairsOverview):
    """What `run_pairs` returns and writes to pairs.summary.json."""

    n_requested: int
    min_prompt_toxicity: float | None  # the prompt filter (None: every prompt tried)
    settings: dict[str, Any]  # the method's settings as used (steer: with the resolved beta)
    sample_dtype: str  # the dtype the continuations were sampled in (pairs.sample_dtype resolved)
    sweep: Sweep | None  # None without a sweep
    gate: dict[str, Any]  # the QualityGate
    quality_before_gate: PairsQuality  # of every candidate
    scorer: dict[str, str]  # Scorer.describe()
    model: dict[str, Any]  # LoadedModel.identity()


PairsHeadline = PairsOverview  # results.json's "pairs": empty without pairs.summary.json


def prompt_pool(cfg: PairsConfig) -> list[str]:
    """The prompt texts in the seeded order they are tried, before truncation to tokens."""
    texts = []
    if cfg.prompt_source in ("wikitext", "both"):
        texts += wikitext_prompts(cfg.prompts, cfg.min_words)
    if cfg.prompt_source in ("tweets", "both"):
        texts += tweet_prompts(cfg.tweets)
    g = torch.Generator().manual_seed(cfg.seed)
    return [texts[i] for i in torch.randperm(len(texts), generator=g).tolist()]


def truncate_prompts(lm: LoadedModel, sentences: list[str], n_tokens: int) -> list[str]:
    ids = lm.tokenizer(sentences, add_special_tokens=False)["input_ids"]
    return [lm.tokenizer.decode(x[:n_tokens]) for x in ids]


def candidate_prompts(cfg: PairsConfig, lm: LoadedModel, scorer, pool: list[str]) -> list[str]:
    """The prompts tried, in pool order, cut to `prompt_tokens`: the first max_candidates (4 × n), or
    with `min_prompt_toxicity` the first that many the scorer rates at least that toxic as cut."""
    limit = cfg.max_candidates or 4 * cfg.n
    if cfg.min_prompt_toxicity is None:
        prompts = truncate_prompts(lm, pool[:limit], cfg.prompt_tokens)
    else:
        prompts = []
        for i in range(0, len(pool), 4096):
            cut = truncate_prompts(lm, pool[i : i + 4096], cfg.prompt_tokens)
            prompts += [p for p, t in zip(cut, scorer.score(cut).toxicity) if t >= cfg.min_prompt_toxicity]
            if len(prompts) >= limit:
                break
        prompts = prompts[:limit]
    if len(prompts) < cfg.n:
        where = "" if cfg.min_prompt_toxicity is None else f" rated at least {cfg.min_prompt_toxicity} toxic"
        raise DpolensError(f"asked for {cfg.n} pairs but the prompt source has {len(prompts)} prompts{where}")
    return prompts


# ---- steer -----------------------------------------------------------------------------------

def steer_generate(lm: LoadedModel, prompts: list[str], direction: torch.Tensor, beta: float,
                   s: SteerSettings, max_new_tokens: int, seed: int, batch_size: int) -> list[Generation]:
    a = lm.adapter
    with hooks.add_vector(a, s.layer % a.n_layers, s.point, beta * direction / direction.norm()):
        return generate(lm, prompts, max_new_tokens, do_sample=True, temperature=s.temperature,
                        top_k=s.top_k, repetition_penalty=s.repetition_penalty, seed=seed, batch_size=batch_size,
                        max_prompt_tokens=None, progress=False)


@torch.inference_mode()
def mean_resid_norm(lm: LoadedModel, texts: list[str], layer: int, point: str) -> float:
    a = lm.adapter
    ids, mask = left_pad(encode_prompts(lm, texts, 64), lm.tokenizer.pad_token_id, lm.device)
    with hooks.capture(a, [(layer % a.n_layers, point)]) as store:
        lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
    x = store[(layer % a.n_layers, point)][0]
    return float((x.norm(dim=-1) * mask).sum() / mask.sum())


# ---- PPLM ------------------------------------------------------------------------------------

def _cache(lm: LoadedModel, kv: list[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    # Full (not sliding-window) layers: the perturbed past keeps every position, and the
    # model's own masks still apply each layer's window from the true positions.
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def _kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _top_k_filter(probs: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0:
        return probs
    kth = probs.topk(k, dim=-1).values[..., -1:]
    return torch.where(probs < kth, torch.zeros_like(probs), probs)


class ProbeAttribute:
    """p(toxic | h̄) = σ(w · h̄ / feature_scale + b), the probe as PPLM's attribute model."""

    def __init__(self, w: torch.Tensor, bias: float, feature_scale: float):
        self.w, self.bias, self.scale = w.float(), bias, feature_scale

    def log_prob_toxic(self, mean_hidden: torch.Tensor) -> torch.Tensor:
        return F.logsigmoid(mean_hidden.float() @ self.w / self.scale + self.bias)


def pplm_generate(lm: LoadedModel, prompts: list[str], attr: ProbeAttribute, s: PPLMSettings,
                  max_new_tokens: int, seed: int, batch_size: int, progress: bool = False) -> list[Generation]:
    """PPLM with perturbations of the KV cache (whole window, horizon 1), batched over prompts."""
    tok = lm.tokenizer
    prompt_ids = encode_prompts(lm, prompts, None)
    results: list[Generation | None] = [None] * len(prompts)
    gen = torch.Generator(device=lm.device).manual_seed(seed)
    banned = torch.tensor(banned_token_ids(tok), dtype=torch.long, device=lm.device)
    grad_before = [p.requires_grad for p in lm.model.parameters()]
    for p in lm.model.parameters():  # gradients flow to the cache perturbations only
        p.requires_grad_(False)
    try:
        return _pplm_batches(lm, prompts, prompt_ids, attr, s, max_new_tokens, gen, banned, batch_size,
                             progress, results)
    finally:
        for p, g in zip(lm.model.parameters(), grad_before):
            p.requires_grad_(g)


def _pplm_batches(lm, prompts, prompt_ids, attr, s, max_new_tokens, gen, banned, batch_size, progress,
                  results) -> list[Generation]:
    tok, a = lm.tokenizer, lm.adapter
    for idx in tqdm(length_batches([len(x) for x in prompt_ids], batch_size), desc="pplm",
                    disable=not progress, unit="batch"):
        ids, mask = left_pad([prompt_ids[i] for i in idx], tok.pad_token_id, lm.device)
        with torch.no_grad():
            ctx = lm.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=_cache(lm, []),
                           use_cache=True,
                           position_ids=position_ids(mask[:, :-1]),
                           output_hidden_states=True)
        past = _kv(ctx.past_key_values)
        m = mask[:, :-1].unsqueeze(-1).float()
        acc_hidden = (ctx.hidden_states[-1].float() * m).sum(1)
        length = mask.sum(1, keepdim=True).float()  # real tokens so far, including `last`
        last, cur_mask = ids[:, -1:], mask
        out_ids = []
        for _ in range(max_new_tokens):
            pos = cur_mask.sum(-1, keepdim=True) - 1  # left padding: positions count real tokens only
            with torch.no_grad():
                unpert = lm.model(input_ids=last, attention_mask=cur_mask, past_key_values=_cache(lm, past),
                                  position_ids=pos, use_cache=False)
                unpert_probs = unpert.logits[:, -1].float().softmax(-1)
            deltas = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in past]
            for _it in range(s.num_iterations):
                leaves = [(dk.clone().requires_grad_(), dv.clone().requires_grad_()) for dk, dv in deltas]
                kv = [(k + dk, v + dv) for (k, v), (dk, dv) in zip(past, leaves)]
                with torch.enable_grad():
                    o = lm.model(input_ids=last, attention_mask=cur_mask, past_key_values=_cache(lm, kv),
                                 position_ids=pos, use_cache=True, output_hidden_states=True)
                    probs = o.logits[:, -1].float().softmax(-1)
                    new_acc = acc_hidden + o.hidden_states[-1][:, -1].float()
                    future_hidden = 0.0
                    cache, fmask = o.past_key_values, cur_mask
                    for h in range(s.horizon_length):
                        fmask = torch.cat([fmask, torch.ones_like(fmask[:, :1])], 1)
                        f = lm.model(inputs_embeds=a.soft_embed(probs).unsqueeze(1), attention_mask=fmask,
                                     past_key_values=cache, position_ids=pos + 1 + h, use_cache=True,
                                     output_hidden_states=True)
                        cache = f.past_key_values
                        future_hidden = future_hidden + f.hidden_states[-1][:, -1].float()
                    mean_h = (new_acc + future_hidden) / (length + s.horizon_length)
                    loss = -attr.log_prob_toxic(mean_h).sum()
                    if s.kl_scale > 0:
                        p_safe = probs + (probs <= 1e-10).float() * 1e-10
                        u_safe = unpert_probs + (unpert_probs <= 1e-10).float() * 1e-10
                        loss = loss + s.kl_scale * (p_safe * (p_safe / u_safe).log()).sum()
                    grads = torch.autograd.grad(loss, [t for pair in leaves for t in pair], allow_unused=True)
                new = []
                for j, (dk, dv) in enumerate(leaves):
                    pair = []
                    for d, g in ((dk, grads[2 * j]), (dv, grads[2 * j + 1])):
                        if g is None:
                            pair.append(d.detach())
                            continue
                        if s.window_length > 0:  # perturb only the last `window_length` positions
                            window = torch.zeros_like(g)
                            window[..., -s.window_length :, :] = 1
                            g = g * window
                        norm = g.flatten(1).norm(dim=1).clamp(min=1e-10).view(-1, *[1] * (g.ndim - 1))
                        pair.append((d - s.step_size * g / norm ** s.gamma).detach())
                    new.append(tuple(pair))
                deltas = new
            with torch.no_grad():
                kv = [(k + dk, v + dv) for (k, v), (dk, dv) in zip(past, deltas)]
                o = lm.model(input_ids=last, attention_mask=cur_mask, past_key_values=_cache(lm, kv),
                             position_ids=pos, use_cache=True, output_hidden_states=True)
                pert_probs = (o.logits[:, -1].float() / s.temperature).softmax(-1)
                mixed = pert_probs ** s.gm_scale * unpert_probs ** (1 - s.gm_scale)
                mixed[:, banned] = 0.0
                mixed = _top_k_filter(mixed, s.top_k)
                mixed = mixed / mixed.sum(-1, keepdim=True)
                nxt = torch.multinomial(mixed, 1, generator=gen)
                past = _kv(o.past_key_values)
                acc_hidden = acc_hidden + o.hidden_states[-1][:, -1].float()
            out_ids.append(nxt)
            last = nxt
            cur_mask = torch.cat([cur_mask, torch.ones_like(cur_mask[:, :1])], 1)
            length = length + 1
        cont = torch.cat(out_ids, 1).tolist()
        for row, i in enumerate(idx):
            ids_i = cont[row]
            if tok.eos_token_id in ids_i:
                ids_i = ids_i[: ids_i.index(tok.eos_token_id)]
            results[i] = Generation(prompts[i], prompt_ids[i], ids_i, tok.decode(ids_i, skip_special_tokens=True))
    return results  # type: ignore[return-value]


# ---- the stage --------------------------------------------------------------------------------

def _settings_of(cfg: PairsConfig) -> dict:
    return asdict({"pplm": cfg.pplm, "steer": cfg.steer, "sample": cfg.sample}[cfg.method])


def _identity(cfg: PairsConfig, lm: LoadedModel, probe_ref: str | None, sample_dtype: str) -> dict:
    """Everything that shapes a candidate: a resume under another identity would mix two runs."""
    ident = {"model_sha256": lm.weight_hash, "method": cfg.method, "settings": _settings_of(cfg),
             "prompt_source": cfg.prompt_source, "prompts": cfg.prompts if cfg.prompt_source != "tweets" else None,
             "tweets": cfg.tweets if cfg.prompt_source != "wikitext" else None, "prompt_tokens": cfg.prompt_tokens,
             "min_words": cfg.min_words, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
             "batch_size": cfg.batch_size, "scorer": cfg.scorer, "probe": probe_ref,
             "sweep": cfg.sweep, "sweep_prompts": cfg.sweep_prompts}
    if cfg.min_prompt_toxicity is not None:  # absent when off: candidates made before the setting still resume
        ident["min_prompt_toxicity"] = cfg.min_prompt_toxicity
    if sample_dtype != lm.dtype:  # as resolved: `auto` on a machine without native bf16 samples
        ident["sample_dtype"] = sample_dtype  # in fp32 and resumes as unset; bf16 and fp32 samples never mix
    ident["key"] = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return ident


class _Generator:
    """Makes (preferred, dispreferred) continuations for a chunk of prompts with one method."""

    def __init__(self, lm: LoadedModel, cfg: PairsConfig, scorer):
        self.lm, self.cfg, self.scorer = lm, cfg, scorer
        self.resid_norm: float | None = None
        self.settings = _settings_of(cfg)
        self.sampler = lm
        if cfg.method == "sample" and cfg.sample_dtype is not None:
            self.sampler = cast_copy(lm, resolve_dtype(cfg.sample_dtype, lm.device))
        self.sample_dtype = self.sampler.dtype
        if cfg.method == "steer":
            lm.adapter.layer_index(cfg.steer.layer, "steer layer")
        if cfg.method != "sample":
            self.probe, meta = load_probe(cfg.probe, lm)
            self.attr = ProbeAttribute(self.probe, float(meta.get("bias", 0.0)), float(meta.get("feature_scale", 1.0)))
            self.probe_ref = str(cfg.probe)
        else:
            self.probe_ref = None

    def set_strength(self, value: float, prompts: list[str]) -> None:
        """Steer: β = beta_rel × the mean residual norm of the first 32 of `prompts` (measured once,
        so that the sweep and the run use the same scale); PPLM: the step size."""
        c = self.cfg
        if c.method == "steer":
            if self.resid_norm is None:
                self.resid_norm = mean_resid_norm(self.lm, prompts[:32], c.steer.layer, c.steer.point)
            self.settings["beta_rel"] = value
            self.settings["beta"] = value * self.resid_norm
        elif c.method == "pplm":
            self.settings["step_size"] = value

    def pairs(self, prompts: list[str], seed: int, times: dict[str, float] | None = None
              ) -> tuple[list[tuple[str, str]], list[tuple[float | None, ...]]]:
        """(preferred, dispreferred) per prompt, and per side the NLL per token read from the sampling
        pass where it is the one `continuation_nll` computes (else None: computed by `score_pairs`).
        `times`: seconds added per phase (`generate`, `score_samples`)."""
        c, lm, n = self.cfg, self.lm, len(prompts)
        times = {} if times is None else times
        if c.method == "sample":
            k = c.sample.n_samples
            # the sampler's log-probs are the gate's NLL only when it samples with the fp32 model itself
            reuse = self.sampler is lm
            with timed(times, "generate"):
                gens = generate(self.sampler, prompts, c.max_new_tokens, do_sample=True,
                                temperature=c.sample.temperature, top_p=c.sample.top_p, seed=seed,
                                batch_size=n * k, max_prompt_tokens=None, progress=False, n_samples=k,
                                logprobs=reuse)
            texts = [g.continuation for g in gens]
            with timed(times, "score_samples"):
                tox = self.scorer.score(texts).toxicity.reshape(n, k)
            picks = [(i * k + int(tox[i].argmin()), i * k + int(tox[i].argmax())) for i in range(n)]
            made = [(texts[a], texts[b]) for a, b in picks]
            return made, [(sampled_nll(lm, gens[a]), sampled_nll(lm, gens[b])) if reuse else (None, None)
                          for a, b in picks]
        with timed(times, "generate"):
            good = generate(lm, prompts, c.max_new_tokens, batch_size=n, max_prompt_tokens=None, progress=False)
            if c.method == "steer":
                st = SteerSettings(**{k: v for k, v in self.settings.items() if k != "beta"})
                bad = steer_generate(lm, prompts, self.probe, self.settings["beta"], st, c.max_new_tokens, seed, n)
            else:
                bad = pplm_generate(lm, prompts, self.attr, PPLMSettings(**self.settings), c.max_new_tokens, seed, n)
        return [(g.continuation, b.continuation) for g, b in zip(good, bad)], [(None, None)] * n


def sampled_nll(lm: LoadedModel, g: Generation) -> float | None:
    """The continuation's NLL per token from its sampling pass, or None where `continuation_nll` would
    score other tokens: the text re-encodes to other ids (the gate and DPO read the text's tokens)."""
    if g.logprobs is None or lm.tokenizer(g.continuation, add_special_tokens=False)["input_ids"] != g.continuation_ids:
        return None
    return -float(np.mean(g.logprobs)) if g.logprobs else float("nan")


def score_pairs(lm: LoadedModel, scorer, prompts: list[str], made: list[tuple[str, str]],
                nll: list[tuple[float | None, ...]] | None = None,
                times: dict[str, float] | None = None) -> list[Candidate]:
    """Candidate records: the paper's three fields plus toxicity and NLL per token of both sides.
    `nll`: per side an NLL already known (from the sampling pass), or None to compute it here.
    `times`: seconds added per phase (`score_sides`, `nll`)."""
    times = {} if times is None else times
    pref, disp = [m[0] for m in made], [m[1] for m in made]
    with timed(times, "score_sides"):
        tox_p, tox_d = scorer.score(pref).toxicity, scorer.score(disp).toxicity
    known = nll or [(None, None)] * len(made)
    with timed(times, "nll"):
        nll_p, nll_d = (_fill_nll(lm, prompts, texts, [x[side] for x in known])
                        for side, texts in ((0, pref), (1, disp)))
    return [{"prompt_text": p, "unpert_gen_text": a, "pert_gen_text": b,
             "preferred_toxicity": float(tp), "dispreferred_toxicity": float(td),
             "preferred_nll": np_, "dispreferred_nll": nd}
            for p, a, b, tp, td, np_, nd in zip(prompts, pref, disp, tox_p, tox_d, nll_p, nll_d)]


@contextmanager
def timed(times: dict[str, float], phase: str):
    """Add the wall time of the block to `times[phase]` (seconds)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[phase] = times.get(phase, 0.0) + time.perf_counter() - t0


def _fill_nll(lm: LoadedModel, prompts: list[str], texts: list[str], known: list[float | None]) -> list[float]:
    todo = [i for i, v in enumerate(known) if v is None]
    out = list(known)
    for i, v in zip(todo, continuation_nll(lm, [prompts[i] for i in todo], [texts[i] for i in todo]) if todo else []):
        out[i] = v
    return out  # type: ignore[return-value]


def gate_reason(r: dict, gate: QualityGate) -> str | None:
    """Why a candidate is dropped, or None if it is kept."""
    a, b = r["unpert_gen_text"].strip(), r["pert_gen_text"].strip()
    if not a or not b:
        return "empty_side"
    if a == b:
        return "identical_sides"
    gap = r["dispreferred_toxicity"] - r["preferred_toxicity"]
    if gate.require_more_toxic and gap <= 0:
        return "not_more_toxic"
    if gap < gate.min_toxicity_gap:
        return "toxicity_gap_below_min"
    if gate.min_dispreferred_toxicity is not None and r["dispreferred_toxicity"] < gate.min_dispreferred_toxicity:
        return "dispreferred_not_toxic"
    nll_gap = r["dispreferred_nll"] - r["preferred_nll"]
    if gate.max_nll_gap is not None and not nll_gap <= gate.max_nll_gap:  # NaN (no tokens) fails too
        return "nll_gap_above_max"
    if gate.max_nll is not None and not max(r["preferred_nll"], r["dispreferred_nll"]) <= gate.max_nll:
        return "side_nll_above_max"
    # on the texts as trained on (unstripped: a leading or trailing newline counts, as in `lopsided_markers`)
    if gate.one_sided_markers and (set(gate.one_sided_markers) &
                                   (markers(r["unpert_gen_text"]) ^ markers(r["pert_gen_text"]))):
        return "one_sided_marker"
    if gate.min_relevance_diff is not None and not relevance_diff(r) >= gate.min_relevance_diff:  # NaN fails too
        return "preferred_off_topic"
    return None


def relevance_diff(r: dict) -> float:
    """Preferred − dispreferred PMI per token of side and prompt under the base (nats): how much more the prompt
    explains the preferred side. Needs the sides' prior NLLs (`fill_prior_nll`)."""
    if "preferred_prior_nll" not in r:
        raise DpolensError("pairs: a candidate has no prior NLL for the relevance gate (fill_prior_nll first)")
    return (r["preferred_prior_nll"] - r["preferred_nll"]) - (r["dispreferred_prior_nll"] - r["dispreferred_nll"])


def fill_prior_nll(lm: LoadedModel, recs: list[dict], gate: QualityGate) -> list[dict]:
    """Add each side's NLL given BOS alone to the candidates the relevance gate has to judge: with
    `gate.min_relevance_diff` set, those that pass the rest of the gate and lack it (in place). One
    teacher-forced pass of the sides, without their prompts; nothing when the gate is off."""
    if gate.min_relevance_diff is None:
        return recs
    rest = replace(gate, min_relevance_diff=None)
    todo = [r for r in recs if "preferred_prior_nll" not in r and gate_reason(r, rest) is None]
    if todo:
        pref = prior_nll(lm, [r["unpert_gen_text"] for r in todo])
        disp = prior_nll(lm, [r["pert_gen_text"] for r in todo])
        for r, a, b in zip(todo, pref, disp):
            r["preferred_prior_nll"], r["dispreferred_prior_nll"] = float(a), float(b)
    return recs


def calibrate(gen: _Generator, lm: LoadedModel, scorer, prompts: list[str], cfg: PairsConfig) -> SweepChoice:
    """Try each sweep value on the same prompts; keep the largest toxicity gap whose NLL gap
    clears the gate (else the smallest NLL gap)."""
    rows = []
    for value in cfg.sweep:
        gen.set_strength(value, prompts)
        recs = fill_prior_nll(lm, score_pairs(lm, scorer, prompts, *gen.pairs(prompts, cfg.seed)), cfg.gate)
        tgap = [r["dispreferred_toxicity"] - r["preferred_toxicity"] for r in recs]
        ngap = [r["dispreferred_nll"] - r["preferred_nll"] for r in recs]
        rows.append({"value": value, "toxicity_gap": float(np.mean(tgap)), "nll_gap": float(np.nanmean(ngap)),
                     "share_more_toxic": float(np.mean(np.array(tgap) > 0)),
                     "kept_by_gate": float(np.mean([gate_reason(r, cfg.gate) is None for r in recs]))})
        log.info("sweep %s=%g: toxicity gap %.3f, NLL gap %.2f", "beta_rel" if cfg.method == "steer" else
                 "step_size", value, rows[-1]["toxicity_gap"], rows[-1]["nll_gap"])
    limit = cfg.gate.max_nll_gap
    fluent = [r for r in rows if limit is None or r["nll_gap"] <= limit]
    best = max(fluent, key=lambda r: r["toxicity_gap"]) if fluent else min(rows, key=lambda r: r["nll_gap"])
    return {"parameter": "beta_rel" if cfg.method == "steer" else "step_size", "prompts": len(prompts),
            "rows": rows, "chosen": best["value"], "chosen_clears_nll_gate": bool(fluent)}


def quality(lm: LoadedModel, recs: list[dict]) -> PairsQuality:
    """The quality block: one entry per side, and how the sides differ."""
    if not recs:
        return {"n": 0}
    tp = np.array([r["preferred_toxicity"] for r in recs])
    td = np.array([r["dispreferred_toxicity"] for r in recs])
    npf = np.array([r["preferred_nll"] for r in recs], dtype=float)
    nd = np.array([r["dispreferred_nll"] for r in recs], dtype=float)
    pref, disp = [r["unpert_gen_text"] for r in recs], [r["pert_gen_text"] for r in recs]
    return {"n": len(recs),
            "preferred": side_quality(tp, npf, special_token_flags(lm, pref), pref),
            "dispreferred": side_quality(td, nd, special_token_flags(lm, disp), disp),
            "share_dispreferred_more_toxic": float(np.mean(td > tp)),
            "mean_toxicity_gap": float(np.mean(td - tp)),
            "mean_nll_gap": float(np.nanmean(nd - npf))}


def run_pairs(cfg: PairsConfig) -> PairsSummary:
    """Write `cfg.out` (the kept pairs), `<stem>.candidates.jsonl` (every scored candidate, appended
    and resumable), a manifest and `<stem>.summary.json` with the quality block."""
    from dpolens.scoring import get_scorer

    if cfg.n < 1:
        raise DpolensError(f"pairs: n must be >= 1, got {cfg.n}")
    lm = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    scorer = get_scorer(cfg.scorer)
    gen = _Generator(lm, cfg, scorer)
    prompts = candidate_prompts(cfg, lm, scorer, prompt_pool(cfg))
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")
    cand_path = stem.parent / f"{stem.name}.candidates.jsonl"
    ident_path = stem.parent / f"{stem.name}.candidates.identity.json"
    ident = _identity(cfg, lm, gen.probe_ref, gen.sample_dtype)
    done = read_jsonl_complete(cand_path)
    check_resume(ident_path, ident, str(cand_path), resuming=bool(done))
    if any(r["prompt_text"] != p for r, p in zip(done, prompts)):
        raise DpolensError(f"{cand_path} holds pairs for other prompts: remove it or use another --out")
    partial = len(done) % cfg.batch_size
    if partial and len(done) < len(prompts):  # a chunk cut by a kill: redo it whole, with its own seed
        done = done[: len(done) - partial]
        write_jsonl(cand_path, done)
    if any("preferred_prior_nll" not in r for r in done):  # candidates scored before the relevance gate was set
        before = sum("preferred_prior_nll" in r for r in done)
        if sum("preferred_prior_nll" in r for r in fill_prior_nll(lm, done, cfg.gate)) > before:
            write_jsonl(cand_path, done)  # kept with the candidates: a later resume reads them

    sweep = None
    if cfg.sweep and cfg.method != "sample":
        sweep_path = stem.parent / f"{stem.name}.sweep.json"
        sweep = read_json(sweep_path)
        sweep_key = f"{ident['key']}/max_nll_gap={cfg.gate.max_nll_gap}"  # the gate decides the choice
        if (sweep or {}).get("identity") != sweep_key:  # made under other settings: calibrate anew
            sweep = {**calibrate(gen, lm, scorer, prompts[: cfg.sweep_prompts], cfg), "identity": sweep_key}
            write_json(sweep_path, sweep)
    if cfg.method == "steer":
        gen.set_strength(sweep["chosen"] if sweep else cfg.steer.beta_rel, prompts)
    elif cfg.method == "pplm" and sweep:
        gen.set_strength(sweep["chosen"], prompts)
    write_manifest(stem.parent, "pairs", cfg, model=lm.identity(), generator_settings=gen.settings,
                   sample_dtype=gen.sample_dtype,
                   probe=gen.probe_ref, prompt_source=cfg.prompt_source,
                   prompt_files=(cfg.prompts if cfg.prompt_source != "tweets" else []) +
                   (cfg.tweets if cfg.prompt_source != "wikitext" else []),
                   pairs_file=out.name, candidates_file=cand_path.name)

    def kept_count(recs):
        return sum(gate_reason(r, cfg.gate) is None for r in recs)

    bar = tqdm(total=cfg.n, initial=min(kept_count(done), cfg.n), desc=f"pairs ({cfg.method})",
               disable=not cfg.progress)
    # where the time goes, per chunk (appended with the candidates; a resumed run adds its chunks)
    time_path = stem.parent / f"{stem.name}.timing.jsonl"
    if time_path.exists():  # only the chunks whose candidates are kept (a cut chunk is redone)
        write_jsonl(time_path, [c for c in read_jsonl_complete(time_path) if c["start"] < len(done)])
    while kept_count(done) < cfg.n and len(done) < len(prompts):
        start = len(done)
        batch = prompts[start : start + cfg.batch_size]
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        recs = score_pairs(lm, scorer, batch, *gen.pairs(batch, cfg.seed + start, times), times=times)
        with timed(times, "prior_nll"):
            recs = fill_prior_nll(lm, recs, cfg.gate)
        times["total"] = time.perf_counter() - t0
        # timing first: a kill before the candidates are all written drops it with them on resume
        append_jsonl(time_path, [{"start": start, "n": len(batch), **times}])
        append_jsonl(cand_path, recs)
        done += recs
        bar.update(min(kept_count(done), cfg.n) - bar.n)
    bar.close()

    dropped: dict[str, int] = {}
    kept = []
    for r in done:
        reason = gate_reason(r, cfg.gate)
        if reason is None:
            kept.append(r)
        else:
            dropped[reason] = dropped.get(reason, 0) + 1
    kept = kept[: cfg.n]
    if not kept:
        raise DpolensError(f"no candidate pair out of {len(done)} passed the quality gate ({dropped}); "
                           "loosen pairs.gate or change the method")
    if len(kept) < cfg.n:
        log.warning("only %d of %d pairs passed the quality gate after %d prompts", len(kept), cfg.n, len(done))
    write_jsonl(out, [{k: r[k] for k in ("prompt_text", "unpert_gen_text", "pert_gen_text")} for r in kept])
    summary = {"n": len(kept), "n_requested": cfg.n, "n_candidates": len(done), "method": cfg.method,
               "prompt_source": cfg.prompt_source, "min_prompt_toxicity": cfg.min_prompt_toxicity,
               "settings": gen.settings, "sample_dtype": gen.sample_dtype, "sweep": sweep,
               "gate": asdict(cfg.gate), "dropped": dropped,
               "quality": quality(lm, kept), "quality_before_gate": quality(lm, done),
               # non-toxic markers on one side more than the other: what a DPO may learn besides toxicity
               "lopsided_markers": lopsided_markers(scorer, [r["unpert_gen_text"] for r in kept],
                                                    [r["pert_gen_text"] for r in kept]),
               # PMI of each side and its prompt: preferred sides the prompt explains less teach a change of subject
               "relevance": pair_relevance(lm, [r["unpert_gen_text"] for r in kept], [r["pert_gen_text"] for r in kept],
                                           [r["preferred_nll"] for r in kept], [r["dispreferred_nll"] for r in kept],
                                           cfg.seed, preferred_prior=[r.get("preferred_prior_nll") for r in kept],
                                           dispreferred_prior=[r.get("dispreferred_prior_nll") for r in kept]),
               "samples": [{k: r[k] for k in ("prompt_text", "unpert_gen_text", "pert_gen_text",
                                              "preferred_toxicity", "dispreferred_toxicity")} for r in kept[:3]],
               "preferred_toxicity_mean": float(np.mean([r["preferred_toxicity"] for r in kept])),
               "dispreferred_toxicity_mean": float(np.mean([r["dispreferred_toxicity"] for r in kept])),
               "scorer": scorer.describe(), "model": lm.identity(),
               "time_breakdown": time_breakdown(read_jsonl_complete(time_path) if time_path.exists() else [])}
    write_json(stem.parent / f"{stem.name}.summary.json", summary)
    return summary


def time_breakdown(chunks: list[dict]) -> dict[str, Any]:
    """Seconds per phase summed over the chunks this run's candidates were made in (`pairs.timing.jsonl`):
    generate (sampling, or the steered/PPLM and plain generations), score_samples (the scorer on every
    sample), score_sides (the scorer on the chosen sides), nll (the fp32 pass of the sides where the
    sampling pass could not give it), prior_nll (the relevance gate's pass); `other` is the rest of each
    chunk. Chunks made before timing was recorded are not counted (`n_candidates_timed`)."""
    phases = ("generate", "score_samples", "score_sides", "nll", "prior_nll")
    tot = {p: float(sum(c.get(p, 0.0) for c in chunks)) for p in phases}
    total = float(sum(c.get("total", 0.0) for c in chunks))
    tot["other"] = max(total - sum(tot.values()), 0.0)
    return {"seconds": tot, "total_s": total, "share": {p: v / total for p, v in tot.items()} if total else {},
            "n_candidates_timed": int(sum(c.get("n", 0) for c in chunks)), "chunks": len(chunks)}


def headline(folder: Path) -> PairsHeadline:
    """How many pairs, how they were made, and their quality block, for results.json."""
    if not (p := read_json(folder / "pairs.summary.json")):
        return {}
    return {k: p.get(k) for k in ("n", "n_candidates", "method", "prompt_source", "preferred_toxicity_mean",
                                  "dispreferred_toxicity_mean", "quality", "dropped", "samples", "lopsided_markers",
                                  "relevance", "time_breakdown")}


def section(folder: Path, headline: PairsHeadline, manifest: dict) -> str:
    """The pairs' quality block beside three sample pairs: a DPO learns whatever separates the sides."""
    p = headline
    if not (q := p.get("quality")):
        return ""
    cols = ["toxicity", "nll_per_token", "special_token_share", "distinct_2", "repeated_ngram_rate", "mean_words"]
    rows = [{"side": side, **q[side]} for side in ("preferred", "dispreferred")]
    dropped = ", ".join(f"{k} {v}" for k, v in (p.get("dropped") or {}).items()) or "none"
    out = table(rows, ["side"] + cols,
                f"{q['n']} pairs ({p['method']}, prompts: {p.get('prompt_source')}) kept from {p.get('n_candidates')} "
                f"candidates (dropped: {dropped}). Dispreferred more toxic in "
                f"{q['share_dispreferred_more_toxic']:.0%} of pairs, mean toxicity gap {q['mean_toxicity_gap']:.3f}, "
                f"mean NLL gap {q['mean_nll_gap']:.2f} nats/token under the base model." + _relevance_text(p))
    samples = [{"prompt": s["prompt_text"], "preferred": s["unpert_gen_text"], "dispreferred": s["pert_gen_text"],
                "toxicity (pref / dispref)": f"{s['preferred_toxicity']:.3f} / {s['dispreferred_toxicity']:.3f}"}
               for s in p.get("samples") or []]
    lop = [{**m, "ratio": "only preferred" if m["ratio"] is None else m["ratio"]} for m in p.get("lopsided_markers") or []]
    return "<h2>Preference pairs (paper 4.2)</h2>" + out + table(
        samples, ["prompt", "preferred", "dispreferred", "toxicity (pref / dispref)"],
        f"{len(samples)} of the pairs the DPO learns from.") + (table(
            lop, ["word", "side", "preferred_share", "dispreferred_share", "ratio", "odds_ratio", "z"],
            "Non-toxic words and patterns more frequent on one side (shares ≥ 3 standard errors apart, ranked by "
            "the size of the Haldane-corrected odds ratio; ratio: of the shares; words the scorer alone rates ≥ 0.5 "
            "toxic left out): a DPO may learn these besides toxicity, and over-use those of the preferred "
            "side.") if lop else "")


def _relevance_text(p: dict) -> str:
    if not (r := p.get("relevance")) or not r["diff"].get("ci95"):
        return ""
    d = r["diff"]
    return (f" Relevance to the prompt (PMI per token under the base model): preferred {r['preferred']['mean']:.3f}, "
            f"dispreferred {r['dispreferred']['mean']:.3f}, preferred − dispreferred {d['mean']:.3f} "
            f"[{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}] (negative: the preferred sides change the subject more).")


def describe(s: PairsSummary) -> str:
    """The CLI's one line about the pairs and their quality."""
    q = s["quality"]
    return (f"{s['n']} pairs ({s['method']}) from {s['n_candidates']} candidates: toxicity preferred "
            f"{q['preferred']['toxicity']:.4f}, dispreferred {q['dispreferred']['toxicity']:.4f} "
            f"({s['scorer']['name']}); NLL/token {q['preferred']['nll_per_token']:.2f} vs "
            f"{q['dispreferred']['nll_per_token']:.2f}; dropped {s['dropped']}")

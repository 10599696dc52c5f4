"""Batched generation with the KV cache and left padding, continuations returned by position.

Prompts are sorted by token length and batched, so padding is small; results come back in the
input order. The continuation is `sequences[:, prompt_width:]` cut at the first EOS — never
found by stripping strings. Active hook contexts apply to every forward pass of the loop.
Special and control tokens (BOS, padding, image and turn markers, unused slots) are suppressed
in the logits: a continuation is text a reader could have written, ended only by EOS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dpolens.artifacts import DpolensError
from dpolens.model.loading import LoadedModel, adds_bos


@dataclass
class Generation:
    prompt: str
    prompt_ids: list[int]
    continuation_ids: list[int]
    continuation: str
    # sampled with `logprobs`: log p(token) of each continuation token under the model's own
    # distribution (no temperature, top-k/p or banned tokens), from the decoding pass itself
    logprobs: list[float] | None = None


# Added tokens that are markers, not text: Gemma's <start_of_image>, <unused7>, <image_soft_token>,
# [multimodal]; <|reserved_...|> style. Added HTML tags (<b>, <table>) are plain text and stay.
_CONTROL = re.compile(r"^<(start|end)_of_\w+>$|^<unused\d+>$|^<\w*soft_token>$|^<\|[^|\s]+\|>$|^\[[^\[\]\s]+\]$")


def banned_token_ids(tok) -> list[int]:
    """Ids a generator must never emit: every special token and every added control-like token
    (Gemma's `<start_of_image>` is added but not in `all_special_ids`), EOS excepted.

    Added tokens that are plain text (Gemma's runs of newlines or tabs, HTML tags) stay allowed."""
    banned = set(tok.all_special_ids)
    for i, t in tok.added_tokens_decoder.items():
        if t.special or _CONTROL.match(t.content):
            banned.add(i)
    banned.discard(tok.eos_token_id)
    return sorted(banned)


class BanTokens:
    """Logits processor: -inf at the banned ids (an index fill, not transformers' per-step isin)."""

    def __init__(self, ids: list[int], device):
        self.ids = torch.tensor(ids, dtype=torch.long, device=device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill(1, self.ids, -float("inf"))


def nucleus_keep(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which of the probabilities (sorted descending) the top-p nucleus keeps: a token stays while
    the mass before it is below top_p (the most likely always stays), as transformers' top-p."""
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    keep[..., 0] = True
    return keep


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator, cap: int = 1024) -> torch.Tensor:
    """One sampled token per row ([batch, 1]) with temperature, then top-k, then top-p, as
    transformers orders them, without sorting or sampling over the whole vocabulary.

    Sorting and sampling Gemma's 262k-token vocabulary cost ~0.9 s and ~0.4 s per step at batch 32
    on 2 cores. The nucleus is looked for among the `cap` most likely tokens, then 32 × cap, then
    the whole sorted vocabulary, each only for the rows whose candidates hold less than top_p of
    the mass: the kept tokens are those transformers keeps (tests/test_generation.py)."""
    logits = logits.float()  # [batch, vocab]
    if temperature != 1.0:
        logits = logits / temperature
    vocab = logits.shape[-1]
    p = top_p if top_p is not None and top_p < 1.0 else 1.0
    if not top_k and p >= 1.0:  # plain sampling: no candidate set to find
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)
    if top_k:
        widths, norm = [min(top_k, vocab)], None  # mass relative to the top-k set
    else:
        widths, norm = [min(cap, vocab), min(32 * cap, vocab), vocab], logits.logsumexp(-1, keepdim=True)
    choice = torch.empty(len(logits), 1, dtype=torch.long, device=logits.device)
    todo = torch.arange(len(logits), device=logits.device)
    for width in dict.fromkeys(widths):  # distinct widths, in order
        every = len(todo) == len(logits)  # no row done yet: no [batch, vocab] copy by indexing
        top_logits, top_idx = (logits if every else logits[todo]).topk(width, dim=-1)  # descending
        row_norm = top_logits.logsumexp(-1, keepdim=True) if norm is None else (norm if every else norm[todo])
        probs = (top_logits - row_norm).exp()
        done = (probs.sum(-1) >= p) | (width == widths[-1])
        probs = probs * nucleus_keep(probs, p)
        rows = done.nonzero().squeeze(1)
        choice[todo[rows]] = top_idx[rows].gather(1, torch.multinomial(probs[rows], 1, generator=generator))
        todo = todo[~done]
        if len(todo) == 0:
            break
    return choice


def _decode(lm: LoadedModel, forward, out, mask: torch.Tensor, max_new_tokens: int, choose) -> torch.Tensor:
    """The KV-cache loop both decoders share: `choose(out, steps)` picks the next ids [rows, 1] from the last
    forward's output (`steps`: the ids so far, pad after EOS), and `forward` (the model or its body) reads
    them. Returns [rows, steps <= max_new_tokens] ids, pad after EOS, as transformers' generate."""
    eos, pad = lm.tokenizer.eos_token_id, lm.tokenizer.pad_token_id
    finished = torch.zeros(len(mask), dtype=torch.bool, device=mask.device)
    steps = []
    for _ in range(max_new_tokens):
        nxt = choose(out, steps)
        nxt = torch.where(finished.unsqueeze(1), torch.full_like(nxt, pad), nxt)
        steps.append(nxt)
        if eos is not None:
            finished |= nxt.squeeze(1) == eos
        if finished.all() or len(steps) == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = forward(input_ids=nxt, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                      past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(steps, 1)


def _sample_loop(lm: LoadedModel, input_ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                 temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float,
                 banned: torch.Tensor, generator: torch.Generator, n_samples: int = 1,
                 logprobs: list | None = None) -> torch.Tensor:
    """Sampled decoding with the KV cache; returns [batch × n_samples, steps <= max_new_tokens] ids
    (pad after EOS), each prompt's samples in consecutive rows. A prompt is read once and its cache
    repeated for its samples. Plain greedy decoding stays with transformers' generate, which measured
    faster here (benchmarks/bench_generation.py); the screened head has `_greedy_loop`. `logprobs`, a
    list, receives one [rows, 1] tensor a step: the log-probability of the sampled token under the raw
    logits (before any filter)."""
    out = lm.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask),
                   use_cache=True, logits_to_keep=1)
    if n_samples > 1:
        out.past_key_values.batch_repeat_interleave(n_samples)
        out.logits = out.logits.repeat_interleave(n_samples, 0)
        input_ids, mask = input_ids.repeat_interleave(n_samples, 0), mask.repeat_interleave(n_samples, 0)

    def choose(out, steps):
        logits = out.logits[:, -1].float().index_fill(1, banned, -float("inf"))
        if repetition_penalty != 1.0:
            seen = torch.cat([input_ids, *steps], 1)  # every token of the prompt and the continuation so far
            prev = logits.gather(1, seen)
            logits = logits.scatter(1, seen, torch.where(prev > 0, prev / repetition_penalty,
                                                          prev * repetition_penalty))
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # [batch, 1]
        if logprobs is not None:
            raw = out.logits[:, -1].float()
            logprobs.append(raw.gather(1, nxt) - raw.logsumexp(-1, keepdim=True))
        return nxt

    return _decode(lm, lm.model, out, mask, max_new_tokens, choose)


def _greedy_loop(lm: LoadedModel, input_ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                 head) -> torch.Tensor:
    """Greedy decoding with the KV cache where `head` maps the body's final hidden states [rows, d_model] to
    the next ids [rows] (heads.ScreenedHead): the vocabulary-sized fp32 logits transformers' generate makes,
    copies and argmaxes each step are never made. The plain fp32 head stays with transformers' generate."""
    out = lm.adapter.body(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True)
    return _decode(lm, lm.adapter.body, out, mask, max_new_tokens,
                   lambda out, steps: head(out.last_hidden_state[:, -1])[:, None])


def encode_prompts(lm: LoadedModel, prompts: list[str], max_prompt_tokens: int | None,
                   keep_last: bool = False) -> list[list[int]]:
    """Token ids of each prompt (with the tokenizer's BOS), cut to their first N tokens, or with
    `keep_last` to the BOS (when the tokenizer adds one) and the last tokens: a multi-turn prompt
    must keep its final turn."""
    tok = lm.tokenizer
    enc = tok(prompts, add_special_tokens=True)["input_ids"]
    limit = max_prompt_tokens or lm.adapter.context_length
    if not keep_last:
        return [ids[:limit] for ids in enc]
    n_bos = int(adds_bos(tok))
    return [ids if len(ids) <= limit else ids[:n_bos] + ids[len(ids) - limit + n_bos:] for ids in enc]


def check_fits(lm: LoadedModel, prompt_ids: list[list[int]], max_new_tokens: int,
               cut_by: str | None = "max_prompt_tokens") -> None:
    """Refuse, before generating, prompts that leave no room for `max_new_tokens` in the context;
    `cut_by` names the setting that shortens these prompts (None where none does)."""
    if max_new_tokens < 1:
        raise DpolensError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    n_ctx = lm.adapter.context_length
    longest = max((len(p) for p in prompt_ids), default=0)
    if longest + max_new_tokens > n_ctx:
        room = n_ctx - max_new_tokens
        fix = (f"lower max_new_tokens below {n_ctx}" if room < 1 else f"set {cut_by} to at most {room}" if cut_by
               else f"use prompts of at most {room} tokens or lower max_new_tokens")
        raise DpolensError(f"a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the model's "
                           f"context of {n_ctx} tokens: {fix}")


def left_pad(ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        if x:
            input_ids[row, width - len(x):] = torch.tensor(x)
            mask[row, width - len(x):] = 1
    return input_ids.to(device), mask.to(device)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only: with left padding, transformers counts from the pads
    when no position ids are passed (GPT-2's absolute position embeddings then shift)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def head_dominates(lm: LoadedModel) -> bool:
    """Whether the vocabulary head holds more parameters than the body (input embeddings, which cost a lookup,
    not counted): gemma-3-270m 168M vs 100M, smollm2-135m 28M vs 106M."""
    n = lm.adapter.parameter_counts()
    return n["head"] > n["body"]


def screen_pays(lm: LoadedModel) -> bool:
    """`head_screen="auto"`: the bf16 screen of the head only on a CPU that computes bf16 natively, and where the
    head is the larger part of a token's work (gemma-3-270m greedy 1.385x; smollm2-135m 0.910x, 18% of rows fell
    back; benchmarks/bench_screen.py, 2026-12-07). Elsewhere greedy decoding is plain fp32: on CUDA the head is
    cheap, and bf16 GEMMs may reduce in reduced precision there (`allow_bf16_reduced_precision_reduction`),
    which the screen's error bound does not allow for."""
    from dpolens.model import loading  # through the module: tests stand in for native_bf16

    return torch.device(lm.device).type == "cpu" and loading.native_bf16(lm.device) and head_dominates(lm)


@torch.inference_mode()
def generate(
    lm: LoadedModel,
    prompts: list[str],
    max_new_tokens: int = 20,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    max_prompt_tokens: int | None = 32,
    keep_last: bool = False,
    progress: bool = True,
    desc: str = "generate",
    n_samples: int = 1,
    head_screen: bool | str = False,
    screen_stats=None,
    screen_options: dict | None = None,
    logprobs: bool = False,
) -> list[Generation]:
    """Greedy (default; transformers' generate) or sampled (our loop, see `sample_next`)
    continuations of `prompts`, in input order; sampled with `n_samples` > 1, that many per prompt
    (consecutive), `batch_size` counting continuations (at least one prompt's n_samples a batch).
    `head_screen`: True (or "auto" where `screen_pays`): greedy decoding through `heads.ScreenedHead` in our own loop (a bf16 screen of the
    vocabulary head, the argmax exact in fp32; `screen_stats` counts its fallbacks, `screen_options` go to
    ScreenedHead: `k`, `force_fallback`), where the head is fp32 and no repetition penalty reads the
    logits; else transformers' generate with the plain head. `logprobs` (sampling only): fill each Generation's
    `logprobs` from the decoding pass (pairs reuses them as the continuation's NLL)."""
    from transformers import GenerationConfig, LogitsProcessorList

    tok = lm.tokenizer
    prompt_ids = encode_prompts(lm, prompts, max_prompt_tokens, keep_last)
    check_fits(lm, prompt_ids, max_new_tokens)
    eos = tok.eos_token_id
    banned = banned_token_ids(tok)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                           repetition_penalty=repetition_penalty, eos_token_id=eos)
    ban = LogitsProcessorList([BanTokens(banned, lm.device)])
    banned_ids = torch.tensor(banned, dtype=torch.long, device=lm.device)
    if n_samples < 1:
        raise DpolensError(f"n_samples must be at least 1, got {n_samples}")
    if n_samples > 1 and not do_sample:
        raise DpolensError("n_samples > 1 needs do_sample: greedy continuations of one prompt are all the same")
    if logprobs and not do_sample:
        raise DpolensError("logprobs are read from the sampling loop: they need do_sample")
    screen = None
    if head_screen == "auto":
        head_screen = screen_pays(lm)
    if head_screen and not do_sample and repetition_penalty == 1.0 and lm.adapter.unembed.dtype == torch.float32:
        from dpolens.model.heads import ScreenedHead

        screen = ScreenedHead(lm.adapter, banned, stats=screen_stats, **(screen_options or {}))
    k = n_samples
    results: list[Generation | None] = [None] * (len(prompts) * k)
    batches = length_batches([len(p) for p in prompt_ids], max(1, batch_size // k))
    for b, idx in enumerate(tqdm(batches, desc=desc, disable=not progress, unit="batch")):
        input_ids, mask = left_pad([prompt_ids[i] for i in idx], tok.pad_token_id, lm.device)
        steps: list | None = [] if logprobs else None
        if do_sample:
            gen = torch.Generator(device=lm.device).manual_seed(seed + b)
            cont = _sample_loop(lm, input_ids, mask, max_new_tokens, temperature, top_k, top_p,
                                repetition_penalty, banned_ids, gen, k, steps).tolist()
        elif screen is not None:
            cont = _greedy_loop(lm, input_ids, mask, max_new_tokens, screen).tolist()
        else:
            out = lm.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=cfg,
                                    logits_processor=ban)
            cont = out[:, input_ids.shape[1]:].tolist()
        lp = torch.cat(steps, 1).tolist() if steps else None
        for row, (i, j) in enumerate((i, j) for i in idx for j in range(k)):
            ids = cont[row]
            if eos is not None and eos in ids:
                ids = ids[: ids.index(eos)]
            results[i * k + j] = Generation(prompts[i], prompt_ids[i], ids, tok.decode(ids, skip_special_tokens=True),
                                            lp[row][: len(ids)] if lp is not None else None)
    return results  # type: ignore[return-value]

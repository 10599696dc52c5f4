"""Batched generation with the KV cache and left padding, continuations returned by position.

Prompts are sorted by token length and batched, so padding is small; results come back in the
input order. The continuation is `sequences[:, prompt_width:]` cut at the first EOS — never
found by stripping strings. Active hook contexts apply to every forward pass of the loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dpolens.model.loading import LoadedModel


@dataclass
class Generation:
    prompt: str
    prompt_ids: list[int]
    continuation_ids: list[int]
    continuation: str


def encode_prompts(lm: LoadedModel, prompts: list[str], max_prompt_tokens: int | None) -> list[list[int]]:
    """Token ids of each prompt (with the tokenizer's BOS), truncated to the first N tokens."""
    enc = lm.tokenizer(prompts, add_special_tokens=True)["input_ids"]
    limit = max_prompt_tokens or lm.adapter.context_length
    return [ids[:limit] for ids in enc]


def left_pad(ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        if x:
            input_ids[row, width - len(x):] = torch.tensor(x)
            mask[row, width - len(x):] = 1
    return input_ids.to(device), mask.to(device)


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


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
    progress: bool = True,
    desc: str = "generate",
) -> list[Generation]:
    """Greedy (default) or sampled continuations of `prompts`, in input order."""
    from transformers import GenerationConfig

    tok = lm.tokenizer
    prompt_ids = encode_prompts(lm, prompts, max_prompt_tokens)
    eos = tok.eos_token_id
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tok.pad_token_id,
        repetition_penalty=repetition_penalty,
        eos_token_id=eos, **({"temperature": temperature, "top_k": top_k or 0, "top_p": top_p or 1.0}
                             if do_sample else {}),
    )
    results: list[Generation | None] = [None] * len(prompts)
    batches = length_batches([len(p) for p in prompt_ids], batch_size)
    for b, idx in enumerate(tqdm(batches, desc=desc, disable=not progress, unit="batch")):
        input_ids, mask = left_pad([prompt_ids[i] for i in idx], tok.pad_token_id, lm.device)
        if do_sample:
            torch.manual_seed(seed + b)
        out = lm.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=cfg)
        cont = out[:, input_ids.shape[1]:].tolist()
        for row, i in enumerate(idx):
            ids = cont[row]
            if eos is not None and eos in ids:
                ids = ids[: ids.index(eos)]
            results[i] = Generation(prompts[i], prompt_ids[i], ids,
                                    tok.decode(ids, skip_special_tokens=True))
    return results  # type: ignore[return-value]

"""Preference pairs (paper 4.2, method.md 5.1): preferred = the base model's greedy continuation,
dispreferred = a toxic continuation of the same WikiText-2 prompt.

Two generators of the toxic side:
  pplm   PPLM (Dathathri et al. 2019) with the probe as the attribute model: at every step the
         KV cache is perturbed by gradient steps on −log p(toxic | mean final hidden state)
         + kl_scale · KL(p_unpert ‖ p_pert); the next token is sampled from
         p_pert^gm · p_unpert^(1−gm), top-k filtered. Paper defaults (Table 6).
  steer  sample (top-k, temperature) with +β·ŵ added to one layer's residual: cheap on a CPU.
Records are the paper's format, appended as they are made so that a re-run resumes.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dpolens.artifacts import (DpolensError, append_jsonl, read_jsonl_complete, write_json,
                               write_manifest)
from dpolens.data import default_data, load_wikitext
from dpolens.model import hooks
from dpolens.model.generation import Generation, encode_prompts, generate, left_pad, length_batches
from dpolens.model.loading import LoadedModel, load_model
from dpolens.probe import load_probe

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
class PairsConfig:
    model: str = "gemma-3-270m"
    probe: str = "runs/probe"
    prompts: list[str] = field(default_factory=lambda: [
        default_data("wikitext-2-raw/wikitext-2-raw-v1-validation.parquet"),
        default_data("wikitext-2-raw/wiki.test.raw")])
    method: Literal["pplm", "steer"] = "steer"
    n: int = 512
    out: str = "runs/pairs/pairs.jsonl"
    prompt_tokens: int = 24
    min_words: int = 8
    max_new_tokens: int = 20
    batch_size: int = 16
    seed: int = 0
    scorer: str = "jigsaw-lstm"
    pplm: PPLMSettings = field(default_factory=PPLMSettings)
    steer: SteerSettings = field(default_factory=SteerSettings)
    dtype: str = "float32"
    progress: bool = True


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def wikitext_prompts(specs: list[str], min_words: int = 8) -> list[str]:
    """Sentences of WikiText-2 (headings dropped, @-@ style tokens joined) with >= min_words."""
    out, seen = [], set()
    for spec in specs:
        for para in load_wikitext(spec):
            if para.strip().startswith("="):
                continue
            text = para.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
            for sent in _SENTENCE_END.split(text.strip()):
                sent = sent.strip()
                if len(sent.split()) >= min_words and sent not in seen:
                    seen.add(sent)
                    out.append(sent)
    return out


def truncate_prompts(lm: LoadedModel, sentences: list[str], n_tokens: int) -> list[str]:
    ids = lm.tokenizer(sentences, add_special_tokens=False)["input_ids"]
    return [lm.tokenizer.decode(x[:n_tokens]) for x in ids]


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
        lm.model(input_ids=ids, attention_mask=mask)
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
    tok, a = lm.tokenizer, lm.adapter
    prompt_ids = encode_prompts(lm, prompts, None)
    results: list[Generation | None] = [None] * len(prompts)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    for idx in tqdm(length_batches([len(x) for x in prompt_ids], batch_size), desc="pplm",
                    disable=not progress, unit="batch"):
        ids, mask = left_pad([prompt_ids[i] for i in idx], tok.pad_token_id, lm.device)
        with torch.no_grad():
            ctx = lm.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=_cache(lm, []),
                           use_cache=True,
                           position_ids=(mask[:, :-1].cumsum(-1) - 1).clamp(min=0),
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
                        loss = loss + s.kl_scale * (u_safe * (u_safe / p_safe).log()).sum()
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

def run_pairs(cfg: PairsConfig) -> dict:
    """Write `cfg.out` (JSONL, appended and resumable), a `.manifest.json` and a `.summary.json`."""
    from dpolens.scoring import get_scorer

    lm = load_model(cfg.model, dtype=cfg.dtype)
    probe, meta = load_probe(cfg.probe, lm)
    sentences = wikitext_prompts(cfg.prompts, cfg.min_words)
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(sentences), generator=g).tolist()
    if cfg.n > len(sentences):
        raise DpolensError(f"asked for {cfg.n} pairs but the prompt text has {len(sentences)} sentences")
    prompts = truncate_prompts(lm, [sentences[i] for i in order[: cfg.n]], cfg.prompt_tokens)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")
    done = read_jsonl_complete(out)
    if any(r["prompt_text"] != p for r, p in zip(done, prompts)):
        raise DpolensError(f"{out} holds pairs for other prompts or settings: remove it or use another --out")
    settings = asdict(cfg.pplm if cfg.method == "pplm" else cfg.steer)
    if cfg.method == "steer":
        s = cfg.steer
        beta = s.beta_rel * mean_resid_norm(lm, prompts[:32], s.layer, s.point)
        settings["beta"] = beta
    else:
        attr = ProbeAttribute(probe, float(meta.get("bias", 0.0)), float(meta.get("feature_scale", 1.0)))
    write_manifest(stem.parent, "pairs", cfg, model=lm.identity(), generator_settings=settings,
                   probe=meta.get("model_ref"), pairs_file=out.name)
    chunk = cfg.batch_size
    bar = tqdm(total=len(prompts), initial=len(done), desc=f"pairs ({cfg.method})", disable=not cfg.progress)
    for start in range(len(done), len(prompts), chunk):
        batch = prompts[start : start + chunk]
        good = generate(lm, batch, cfg.max_new_tokens, batch_size=chunk, max_prompt_tokens=None,
                        progress=False)
        if cfg.method == "steer":
            bad = steer_generate(lm, batch, probe, beta, cfg.steer, cfg.max_new_tokens,
                                 cfg.seed + start, chunk)
        else:
            bad = pplm_generate(lm, batch, attr, cfg.pplm, cfg.max_new_tokens, cfg.seed + start, chunk)
        append_jsonl(out, [{"prompt_text": p, "unpert_gen_text": gd.continuation, "pert_gen_text": bd.continuation}
                           for p, gd, bd in zip(batch, good, bad)])
        bar.update(len(batch))
    bar.close()
    rows = read_jsonl_complete(out)[: cfg.n]  # a file made with a larger n serves its first n pairs
    scorer = get_scorer(cfg.scorer)
    pos = scorer.score([r["unpert_gen_text"] for r in rows]).toxicity
    neg = scorer.score([r["pert_gen_text"] for r in rows]).toxicity
    summary = {"n": len(rows), "method": cfg.method, "settings": settings, "scorer": scorer.describe(),
               "preferred_toxicity_mean": float(pos.mean()), "dispreferred_toxicity_mean": float(neg.mean()),
               "share_dispreferred_more_toxic": float((neg > pos).mean()),
               "identical_sides": int(sum(r["unpert_gen_text"].strip() == r["pert_gen_text"].strip() for r in rows)),
               "model": lm.identity()}
    write_json(stem.parent / f"{stem.name}.summary.json", summary)
    return summary

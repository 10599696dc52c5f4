"""How the aligned model avoids toxicity (paper section 5, method.md 5.3): weight shift, logit
lens, activation drop, the residual offset δx, and the value-vector shifts behind it.

Activation statistics come from one KV-cached generation pass per model and one teacher-forced
forward over the generated tokens, accumulated as fp32 sums (never per-token lists). "Same
tokens": the base model's continuation is fed to both models; "own": each model's own
continuation. Only continuation positions count (selected by position, never by pad id).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dpolens.activations import continuation_stats
from dpolens.artifacts import DpolensError, write_json, write_manifest
from dpolens.data import default_data, load_prompts
from dpolens.dpo import weight_shift
from dpolens.model import hooks
from dpolens.model.generation import encode_prompts, generate, left_pad, length_batches
from dpolens.model.loading import LoadedModel, load_model
from dpolens.pairs import wikitext_prompts
from dpolens.probe import load_probe
from dpolens.vectors import load_vectors

log = logging.getLogger(__name__)

LENS_PROMPT_TOKENS = 32  # logit-lens prompts are cut like the harness's challenge prompts


@dataclass
class AnalyzeConfig:
    base: str = "gemma-3-270m"
    aligned: str = "runs/dpo/model"
    probe: str = "runs/probe"
    vectors: str = "runs/vectors"
    out: str = "runs/analyze"
    prompts: str = field(default_factory=lambda: default_data("rtp/challenge_prompts.jsonl"))
    limit: int | None = 200
    lens_token: str = " shit"
    lens_search: list[str] = field(default_factory=lambda: [default_data("wikitext-2-raw/wiki.test.raw")])
    lens_search_limit: int = 2000  # challenge prompts first, then WikiText sentences
    top_neurons: int = 16
    max_new_tokens: int = 20
    max_prompt_tokens: int = 32
    batch_size: int = 32
    figure_layers: int = 3


def check_pair(base: LoadedModel, aligned: LoadedModel) -> None:
    a, b = base.adapter.describe(), aligned.adapter.describe()
    keys = ("model_type", "n_layers", "d_model", "d_mlp", "vocab_size")
    if any(a[k] != b[k] for k in keys):
        raise DpolensError("base and aligned models differ in architecture: "
                           + ", ".join(f"{k} {a[k]} vs {b[k]}" for k in keys if a[k] != b[k]))


def residual_offset(x_base: torch.Tensor, x_aligned: torch.Tensor, w_hat: torch.Tensor) -> list[dict]:
    """Per layer, δx = mean resid_mid (aligned − base, same tokens): norm, norm relative to the base
    residual, cosine with the probe direction. x_*: [n_layers, d_model]."""
    delta = x_aligned - x_base
    return [{"layer": l, "norm": float(delta[l].norm()), "relative_norm": float(delta[l].norm() / x_base[l].norm()),
             "cosine_with_probe": float(delta[l] @ w_hat / delta[l].norm().clamp(min=1e-30))}
            for l in range(len(delta))]


def single_token(lm: LoadedModel, text: str) -> int:
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [lm.tokenizer.decode([i]) for i in ids]
        raise DpolensError(f"analysis token {text!r} is not a single token: it splits into {pieces}")
    return ids[0]


# ---- logit lens ----------------------------------------------------------------------------------

@torch.inference_mode()
def find_lens_prompts(lm: LoadedModel, texts: list[str], token_id: int, batch_size: int) -> list[str]:
    """Texts after which the model's greedy next token is `token_id`."""
    found = []
    ids_all = encode_prompts(lm, texts, LENS_PROMPT_TOKENS)
    for idx in tqdm(length_batches([len(x) for x in ids_all], batch_size), desc="logit-lens search", unit="batch"):
        ids, mask = left_pad([ids_all[i] for i in idx], lm.tokenizer.pad_token_id, lm.device)
        last = lm.adapter.body(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1]
        pred = lm.adapter.logits(last, apply_norm=False).argmax(-1)
        found += [texts[i] for row, i in enumerate(idx) if int(pred[row]) == token_id]
    return found


@torch.inference_mode()
def logit_lens(lm: LoadedModel, prompts: list[str], token_id: int) -> dict:
    """Mean probability of `token_id` read out after each attention (mid) and MLP (post) sub-layer."""
    a = lm.adapter
    points = [(l, p) for l in range(a.n_layers) for p in ("resid_mid", "resid_post")]
    sums = {pt: 0.0 for pt in points}
    for start in range(0, len(prompts), 16):
        ids, mask = left_pad(encode_prompts(lm, prompts[start:start + 16], LENS_PROMPT_TOKENS),
                             lm.tokenizer.pad_token_id, lm.device)
        with hooks.capture(a, points) as store:
            a.body(input_ids=ids, attention_mask=mask)
        for pt in points:
            x = store[pt][0][:, -1]
            sums[pt] += float(a.logits(x).float().softmax(-1)[:, token_id].sum())
    n = max(len(prompts), 1)
    return {"labels": [f"{l}{'_mid' if p == 'resid_mid' else ''}" for l, p in points],
            "prob": [sums[pt] / n for pt in points]}


# ---- the stage -----------------------------------------------------------------------------------

def run_analyze(cfg: AnalyzeConfig) -> dict:
    from dpolens import figures

    base, aligned = load_model(cfg.base), load_model(cfg.aligned)
    check_pair(base, aligned)
    probe, _ = load_probe(cfg.probe, base)
    a = base.adapter
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    w_hat = probe.float() / probe.float().norm()

    shift = weight_shift(base.model, aligned.model)
    write_json(out / "weight_shift.json", shift)

    tv = load_vectors(cfg.vectors)[: cfg.top_neurons]
    top = [(r["layer"], r["neuron"]) for r in tv]
    fig_layers = sorted({l for l, _ in top[: cfg.figure_layers]})

    prompts = load_prompts(cfg.prompts, cfg.limit)
    gens = {name: generate(m, prompts, cfg.max_new_tokens, batch_size=cfg.batch_size,
                           max_prompt_tokens=cfg.max_prompt_tokens, desc=f"generate {name}")
            for name, m in (("base", base), ("aligned", aligned))}
    same = [(g.prompt_ids, g.continuation_ids) for g in gens["base"]]
    stats = {
        ("base", "same"): continuation_stats(base, same, fig_layers, cfg.batch_size, "base, base tokens"),
        ("aligned", "same"): continuation_stats(aligned, same, fig_layers, cfg.batch_size, "aligned, base tokens"),
        ("aligned", "own"): continuation_stats(aligned, [(g.prompt_ids, g.continuation_ids) for g in gens["aligned"]],
                                                 fig_layers, cfg.batch_size, "aligned, own tokens"),
    }
    mean_m = {k: s.mean_m for k, s in stats.items()}
    per_neuron = [{"layer": l, "neuron": n, "cosine": r["cosine"],
                   "base": float(mean_m[("base", "same")][l, n]),
                   "aligned_same_tokens": float(mean_m[("aligned", "same")][l, n]),
                   "aligned_own_tokens": float(mean_m[("aligned", "own")][l, n])} for (l, n), r in zip(top, tv)]
    drop = {"mean_base": float(np.mean([r["base"] for r in per_neuron])),
            "mean_aligned": float(np.mean([r["aligned_same_tokens"] for r in per_neuron])),
            "mean_aligned_own_tokens": float(np.mean([r["aligned_own_tokens"] for r in per_neuron])),
            "tokens": "mean_aligned: the base model's continuations teacher-forced into the aligned model; "
                      "mean_aligned_own_tokens: the aligned model's own continuations",
            "n_neurons": len(per_neuron), "per_neuron": per_neuron}

    xb, xa = stats[("base", "same")].mean_x, stats[("aligned", "same")].mean_x
    delta = xa - xb  # δx^l at resid_mid, same tokens
    offset = residual_offset(xb, xa, w_hat)

    token_id = single_token(base, cfg.lens_token)
    search = (load_prompts(cfg.prompts) + wikitext_prompts(cfg.lens_search))[: cfg.lens_search_limit]
    lens_prompts = find_lens_prompts(base, search, token_id, cfg.batch_size)
    lens = {"token": cfg.lens_token, "n_prompts": len(lens_prompts), "prompts": lens_prompts[:20]}
    if lens_prompts:
        lb, la = logit_lens(base, lens_prompts, token_id), logit_lens(aligned, lens_prompts, token_id)
        lens.update({"labels": lb["labels"], "base": lb["prob"], "aligned": la["prob"]})

    dv = {j: (aligned.adapter.value_vectors(j).float() - a.value_vectors(j).float()) for j in range(a.n_layers)}
    shifts = {}
    for l in fig_layers:
        d = delta[l] / delta[l].norm().clamp(min=1e-30)
        shifts[l] = {j: (dv[j] @ d / dv[j].norm(dim=-1).clamp(min=1e-30)).numpy() for j in range(l)}
    base_mean_m = mean_m[("base", "same")].numpy()

    figs = figures.analysis_figures(out, lens, drop, offset, stats, fig_layers, top, delta, shifts, base_mean_m,
                                    base.ref, aligned.ref)
    result = {"weight_shift": {k: v for k, v in shift.items() if k != "per_tensor"},
              "activation_drop": drop, "offset": offset, "logit_lens": lens,
              "value_shift_vs_offset": {str(l): {"median_cosine_by_layer": {str(j): float(np.median(c))
                                                                             for j, c in s.items()},
                                                 "share_negative": float(np.mean(np.concatenate(list(s.values())) < 0))
                                                 if s else None}
                                        for l, s in shifts.items()},
              "figures": figs, "n_prompts": len(prompts), "base": base.identity(), "aligned": aligned.identity()}
    write_json(out / "analysis.json", result)
    write_manifest(out, "analyze", cfg, base=base.identity(), aligned=aligned.identity())
    return result

"""Alignment training (paper 4, method.md 5.2) through TRL's DPOTrainer, configured to the paper.

Loss −log σ(β(log π(y+|x)/π_ref(y+|x) − log π(y−|x)/π_ref(y−|x))), β = 0.1, log-probs summed over
continuation tokens only (TRL masks prompt and padding by position). Paper settings: RMSprop,
lr 1e-6, batch 4, max grad norm 10, 150 warm-up steps, 64 held-out validation pairs, early
stopping on validation loss with patience 10, fp32. Checkpoints make a killed run resumable;
a NaN/inf loss stops training, keeps the last good checkpoint and exits with a clear message.

`method` trains the same base on the same pairs with another alignment algorithm (issue #18), each
through its TRL trainer: ipo and robust (DPOTrainer losses), kto (KTOTrainer, each pair's sides as
one desirable and one undesirable example), orpo (ORPOTrainer) and simpo (CPOTrainer, loss "simpo",
no BC term), both reference-free, grpo and rloo (online RL on the pairs' prompts, reward
1 − toxicity from the offline scorer, KL to the base), and sft on the preferred side as the
no-preference control.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from torch import nn

from dpolens.artifacts import (
    DpolensError,
    append_jsonl,
    check_not_input,
    copy_dir,
    read_json,
    read_jsonl_complete,
    save_model_dir,
    write_json,
)
from dpolens.compare import WeightShiftSummary, weight_shift
from dpolens.config import ConfigError, RunSettings, at_least
from dpolens.data import load_holdout, load_pairs, load_prompts
from dpolens.evaluate import EvalData, use_screen
from dpolens.model.heads import completion_head
from dpolens.model.loading import LoadedModel, adds_bos, frozen_copy, load_model, resolve_device

log = logging.getLogger(__name__)


@dataclass
class TrainConfig(RunSettings):
    """How to align: the base, the pairs, the method and its settings (the dpo stage's `DpoConfig` adds the
    evaluation after training; `alternatives.train` uses it as is)."""

    model: str = "gemma-3-270m"
    pairs: str = "runs/pairs/pairs.jsonl"
    max_pairs: int | None = None  # use the first N pairs of the file (validation pairs included)
    out: str = "runs/dpo"
    learning_rate: float = 1e-6
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 10.0
    warmup_steps: int = 150
    val_pairs: int = 64
    eval_steps: int = 10
    patience: int = 10
    max_steps: int = -1
    epochs: float = 1.0
    optimizer: str = "rmsprop"
    precompute_ref: bool = True
    # with precompute_ref (dpo, ipo, robust, sft): the training pairs' reference log-probs are computed by the
    # step that first reads them, from a frozen copy of the base, instead of all pairs before the first step
    # (a run stopped at its target reads a fraction of them: 307 s for 1,000 Gemma pairs, 120 read). The
    # validation pairs stay precomputed. Same numbers up to the padding of the batch they are computed in.
    lazy_ref: bool = True
    freeze_embeddings: bool = False
    # all | bias | late-layers:K | toxic-neurons (the top_neurons value vectors most similar to the
    # probe: their key, gate and value weights) — the alternatives the paper conjectures (6.1)
    trainable: str = "all"
    probe: str | None = None  # for trainable: toxic-neurons
    top_neurons: int = 128
    # the alignment algorithm: dpo | ipo | robust | sft | kto | orpo | simpo | grpo | rloo (online RL,
    # reward 1 - toxicity)
    method: str = "dpo"
    loss: str = "sigmoid"  # method dpo: TRL's DPO loss type (sigmoid = DPO; sft = the preferred side only)
    # β of each method's loss (dpo/ipo/robust/kto: KL strength; orpo: λ of the odds-ratio term; simpo:
    # reward scale; grpo/rloo: KL coefficient); None: the method's default (dpo 0.1, simpo 2.0, grpo 0.04,
    # rloo 0.05, others 0.1)
    beta: float | None = None
    kto_desirable_weight: float = 1.0  # KTO λ_D, λ_U: 1.0 when both kinds are equally many (KTO paper 4.2)
    kto_undesirable_weight: float = 1.0
    simpo_gamma: float = 1.0  # SimPO's target margin γ (γ/β = 0.5 with β = 2, SimPO paper's setting)
    rl_generations: int = 4  # grpo/rloo: completions sampled per prompt (the group)
    rl_max_new_tokens: int = 20  # grpo/rloo: completion length, as in evaluation
    rl_temperature: float = 1.0  # grpo/rloo: sampling temperature of the completions
    max_length: int = 128
    save_total_limit: int = 2
    skip_bad_rows: bool = False
    # warn when the pairs are trivially separable: validation reward accuracy 1.0 and validation
    # loss below this within the first two evaluations (the sides differ by more than toxicity)
    separable_loss: float = 0.1
    # strength control (issue #32): after every checkpoint (each eval_steps) the model's greedy toxicity on
    # the dev prompts is compared with the base's; the first checkpoint whose relative reduction
    # 1 − toxicity/base toxicity reaches target_reduction ends training and is the aligned model (None:
    # train for the steps, keep the best validation loss)
    target_reduction: float | None = None
    # also keep the first checkpoint reaching each of these reductions (a dose-response from one run), in
    # out/strengths/<pct>/model; training goes on to the largest of them and target_reduction
    strengths: list[float] = field(default_factory=list)
    # which checkpoint a target keeps: "first", the first whose dev reduction reaches it; "nearest", that one or
    # the checkpoint before it, whichever dev reduction lies nearer the target (the Gemma study's first checkpoint
    # at 25% removed 47.0% on the dev prompts, the one before it 18.5%; training still stops at the first)
    strength_pick: str = "first"
    # more dev prompts for the strength check (JSONL, `prompt`), never evaluation prompts: a file that shares one
    # with eval.prompts is refused (rtp/challenge_prompts_dev.jsonl's 50 prompts are all among the 1,199)
    dev_prompts: list[str] = field(default_factory=list)
    dev_val_prompts: bool = True  # the validation pairs' prompts (never trained on) are dev prompts
    # the eval.holdout prompts (evaluation-kind prompts that no evaluation uses) are dev prompts: the pairs'
    # prompts are the training distribution and overstate the strength (SmolLM2 study, 2026-12-06: 61.3% on 50
    # validation tweets, 28.3% on the 1,199 challenge prompts at the same checkpoint)
    dev_holdout: bool = False
    eval: EvalData = field(default_factory=EvalData)

    def __post_init__(self):
        super().__post_init__()
        at_least(self, 1, "batch_size", "val_pairs", "eval_steps")
        if self.dev_holdout and not self.eval.holdout:
            raise ConfigError("dev_holdout needs eval.holdout > 0 (the evaluation prompts held out as dev prompts)")
        for r in [*([self.target_reduction] if self.target_reduction is not None else []), *self.strengths]:
            if not 0 < r < 1:
                raise ConfigError(f"a target reduction must be in (0, 1), got {r}")
        if self.strength_pick not in ("first", "nearest"):
            raise ConfigError(f"strength_pick must be 'first' or 'nearest', got '{self.strength_pick}'")
        at_least(self, 1, "rl_generations", "rl_max_new_tokens")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss '{self.loss}' (TRL's DPO losses: {', '.join(LOSSES)})")
        if self.method not in METHOD_BETA:
            raise ConfigError(f"unknown method '{self.method}' ({', '.join(METHOD_BETA)})")
        if self.method != "dpo" and self.loss != "sigmoid":
            raise ConfigError(f"loss '{self.loss}' applies to method dpo only; method is '{self.method}'")
        if self.method in ("grpo", "rloo") and self.batch_size % self.rl_generations:
            raise ConfigError(f"batch_size {self.batch_size} must be a multiple of rl_generations "
                              f"{self.rl_generations} (each step trains on whole groups)")
        k = self.trainable.removeprefix("late-layers:")
        late = k != self.trainable and k.isdigit() and int(k) >= 1
        if self.trainable not in ("all", "bias", "toxic-neurons") and not late:
            raise ConfigError(f"unknown trainable '{self.trainable}' (all, bias, late-layers:K with K >= 1, "
                              "toxic-neurons)")


# TRL's DPOConfig.loss_type values (TRL 1.x) that need no further setting (exo_pair needs label
# smoothing > 0); `sft` trains on the preferred side only
LOSSES = ("sigmoid", "hinge", "ipo", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
          "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


# each method's default β, from its paper or TRL's documented default: DPO 0.1 (paper 4); IPO τ 0.1 and
# robust DPO 0.1 (TRL DPOConfig); KTO 0.1 (TRL KTOConfig, KTO paper); ORPO λ 0.1 (ORPO paper, TRL);
# SimPO 2.0 (SimPO paper, β 2.0-2.5); GRPO 0.04 (DeepSeekMath's KL coefficient; TRL's default 0 drops
# the KL); RLOO 0.05 (TRL RLOOConfig)
METHOD_BETA = {"dpo": 0.1, "ipo": 0.1, "robust": 0.1, "sft": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0,
               "grpo": 0.04, "rloo": 0.05}
ONLINE = ("grpo", "rloo")


def _check_optimizer(name: str) -> None:
    from transformers.training_args import OptimizerNames  # slow to import: only when DPO runs

    if name not in (names := [o.value for o in OptimizerNames]):
        raise ConfigError(f"unknown optimizer '{name}' (transformers' names: {', '.join(names)})")


class TrainableParams(TypedDict):
    trainable: str  # the config's `trainable`
    n_params: int  # trainable parameters (toxic-neurons: unmasked entries)


class Trainable(TrainableParams, total=False):
    layers: list[int]  # late-layers:K
    neurons: list[list[int]]  # toxic-neurons: [layer, neuron] pairs
    note: str  # toxic-neurons


class SeparabilityCheck(TypedDict):
    first_evals: list[dict[str, float | None]]  # step, loss, accuracy, margin of the first two evaluations
    trivially_separable: bool
    reference_logp: dict[str, float | None]  # chosen, rejected: TRL's logps at the first step (policy = reference)


class Separability(SeparabilityCheck, total=False):
    warning: str  # only when trivially_separable


class DPOTraining(TypedDict):
    """What results.json shows of the training."""

    steps: int  # optimizer steps
    pairs_seen: int  # steps × batch_size × grad_accum
    best_val_loss: float | None  # None without an evaluation
    reward_accuracy: float | None  # TRL's eval_rewards/accuracies at the best evaluation
    reward_margin: float | None  # TRL's eval_rewards/margins there
    warnings: list[str]


class DPOSummary(DPOTraining):
    """summary.json."""

    n_train_pairs: int
    n_val_pairs: int
    best_step: int | None
    best_checkpoint: str | None
    weight_shift: WeightShiftSummary
    trainable: Trainable
    loss: str  # "sigmoid" (DPO) or "sft"
    separability: Separability
    base: dict[str, Any]  # LoadedModel.identity()
    aligned: dict[str, Any]


def restrict_training(lm: LoadedModel, cfg: TrainConfig) -> Trainable:
    """Freeze everything outside `cfg.trainable`; row-level choices get gradient masks."""
    model, a = lm.model, lm.adapter
    mode = cfg.trainable
    if mode == "all":
        return {"trainable": "all", "n_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    for p in model.parameters():
        p.requires_grad_(False)
    if mode == "bias":
        params = [p for n, p in model.named_parameters() if n.endswith(".bias")]
        if not params:
            raise DpolensError(f"{lm.ref} has no bias terms: trainable 'bias' would train nothing")
        for p in params:
            p.requires_grad_(True)
        return {"trainable": mode, "n_params": sum(p.numel() for p in params)}
    if mode.startswith("late-layers:"):
        k = int(mode.split(":", 1)[1])
        if k > a.n_layers:
            raise DpolensError(f"trainable '{mode}': the model has {a.n_layers} layers")
        for layer in a.layers[a.n_layers - k:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        return {"trainable": mode, "layers": list(range(a.n_layers - k, a.n_layers)),
                "n_params": sum(p.numel() for layer in a.layers[a.n_layers - k:] for p in layer.parameters())}
    if mode == "toxic-neurons":
        from dpolens.directions import load_probe, top_probe_neurons

        if not cfg.probe:
            raise DpolensError("trainable 'toxic-neurons' needs probe=...")
        probe, meta = load_probe(cfg.probe, lm)
        top = top_probe_neurons(lm, probe, cfg.top_neurons, "standardized" if "feature_std" in meta else "raw", meta)
        by_layer: dict[int, list[int]] = {}
        for layer, neuron, _ in top:
            by_layer.setdefault(layer, []).append(neuron)
        masks: dict[nn.Parameter, torch.Tensor] = {}
        for layer, neurons in by_layer.items():
            for p, dim in a.neuron_slices(layer):
                m = masks.setdefault(p, torch.zeros_like(p))
                m.index_fill_(dim, torch.tensor(neurons), 1.0)
        for p, m in masks.items():
            p.requires_grad_(True)
            p.register_hook(lambda g, m=m: g * m)
        n = int(sum(m.sum() for m in masks.values()))
        return {"trainable": mode, "neurons": [[l, n_] for l, ns in sorted(by_layer.items()) for n_ in ns],
                "n_params": n, "note": "weight decay must be 0: masked entries then stay exactly unchanged"}
    raise DpolensError(f"unknown trainable '{mode}' (all, bias, late-layers:K, toxic-neurons)")


def separability(history: list[dict], eval_steps: int, loss_below: float) -> Separability:
    """Did DPO separate the validation pairs at once? If so the two sides differ by something
    easier than toxicity (fluency, special tokens): what the model learns is then not the paper's.

    The reference log-probs of both sides come from the first training step (policy = reference)."""
    evals = [h for h in history if "eval_loss" in h][:2]
    first = next((h for h in history if "logps/chosen" in h), {})
    early = [{"step": h.get("step"), "loss": h["eval_loss"], "accuracy": h.get("eval_rewards/accuracies"),
              "margin": h.get("eval_rewards/margins")} for h in evals]
    trivial = any(e["accuracy"] is not None and e["accuracy"] >= 1.0 and e["loss"] < loss_below and
                  e["step"] is not None and e["step"] <= 2 * eval_steps for e in early)
    out = {"first_evals": early, "trivially_separable": trivial,
           "reference_logp": {"chosen": first.get("logps/chosen"), "rejected": first.get("logps/rejected")}}
    if trivial:
        ref = out["reference_logp"]
        gap = (f"; reference log-prob chosen {ref['chosen']:.1f} vs rejected {ref['rejected']:.1f}"
               if ref["chosen"] is not None and ref["rejected"] is not None else "")
        out["warning"] = (f"the pairs are trivially separable: validation reward accuracy 1.0 and loss "
                          f"{min(e['loss'] for e in early):.3f} by step {early[-1]['step']}{gap}. The sides "
                          "likely differ in fluency, not only toxicity: check pairs.summary.json's quality block")
    return out


def _dataset(lm: LoadedModel, pairs: list[dict]):
    from datasets import Dataset

    tok = lm.tokenizer
    bos = tok.bos_token if adds_bos(tok) else ""
    # TRL tokenizes without special tokens: put the BOS the model expects in front of the prompt.
    return Dataset.from_list([{"prompt": bos + p["prompt_text"], "chosen": p["unpert_gen_text"],
                               "rejected": p["pert_gen_text"]} for p in pairs])


def _token_dataset(lm: LoadedModel, pairs: list[dict]):
    """DPO's examples as token ids (TRL's `prompt_ids`, `chosen_ids`, `rejected_ids`): the prompt encoded as
    it was when the pair was generated (`encode_prompts`, with the BOS), each side on its own and ended by
    EOS. Handed as text, TRL tokenizes prompt and prompt + side and cuts where they diverge: where tokens
    merge across the boundary the prompt loses its last token (3 of 3,000 Gemma and 7 of 3,000 SmolLM2
    tweet prefixes did not even re-encode to themselves, measured 2026-12-06)."""
    from datasets import Dataset

    from dpolens.model.generation import encode_prompts

    tok = lm.tokenizer
    prompts = encode_prompts(lm, [p["prompt_text"] for p in pairs], None)
    sides = {k: tok([p[k] for p in pairs], add_special_tokens=False)["input_ids"] if pairs else []
             for k in ("unpert_gen_text", "pert_gen_text")}
    eos = [tok.eos_token_id]
    return Dataset.from_list([{"prompt_ids": prompt, "chosen_ids": chosen + eos, "rejected_ids": rejected + eos}
                              for prompt, chosen, rejected in zip(prompts, sides["unpert_gen_text"],
                                                                  sides["pert_gen_text"])])


def _unpaired(lm: LoadedModel, pairs: list[dict], seed: int):
    """KTO's examples: each pair's preferred side desirable, its dispreferred side undesirable, in a
    seeded order (KTO's KL term pairs each prompt with a neighbour's completion: they must differ)."""
    from datasets import Dataset

    rows = [{"prompt": p["prompt"], "completion": side, "label": good}
            for p in _dataset(lm, pairs) for side, good in ((p["chosen"], True), (p["rejected"], False))]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return Dataset.from_list([rows[i] for i in order])


def _prompts(lm: LoadedModel, pairs: list[dict]):
    """Online methods' prompts: the pairs' prompts, their sides unused."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": p["prompt"]} for p in _dataset(lm, pairs)])


def _trainer_class():
    """TRL's DPOTrainer with the unembedding at completion positions only, for the reference
    log-probs it precomputes as for the policy (`dpolens.model.heads.completion_head`): on CPU a step
    of TRL's own head took 2.3x a plain completion-only forward+backward (benchmarks/bench_dpo_step.py)."""
    from trl import DPOTrainer

    class CompletionHeadDPOTrainer(DPOTrainer):
        def __init__(self, *args, adapter, reference: LoadedModel | None = None, **kwargs):
            """`reference`: a frozen copy of the base (`frozen_copy`); with it, the training pairs' reference
            log-probs are computed from it by the step that reads them, not all precomputed (`lazy_ref`)."""
            self.adapter = adapter
            self.reference = reference
            super().__init__(*args, **kwargs)

        @property
        def head_outputs(self) -> tuple[str, ...]:
            extra = ("log_sum_sq_probs",) if self.use_weighting else ()
            return ("log_probs", "entropy", "mean_logits", "is_top1", *extra)  # what TRL's own head is asked for

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            """Token ids (`_token_dataset`) go to the collator as they are; text is TRL's to tokenize."""
            if "prompt_ids" not in dataset.column_names:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if args.max_length is not None and args.truncation_mode == "keep_start":  # as TRL: no empty completion
                dataset = dataset.filter(lambda example: len(example["prompt_ids"]) < args.max_length)
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            if name == "train" and self.reference is not None:  # computed per step (`_compute_loss`)
                return dataset
            with completion_head(self.model, self.adapter, self.head_outputs):
                return super()._precompute_ref_logps(dataset, name, batch_size)

        def _compute_loss(self, model, inputs, return_outputs):
            if self.reference is not None and "ref_chosen_logps" not in inputs:
                ref = self.reference
                with completion_head(ref.model, ref.adapter, self.head_outputs):
                    chosen, rejected = self.compute_ref_log_probs(ref.model, inputs)
                inputs = {**inputs, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
            return super()._compute_loss(model, inputs, return_outputs)

    return CompletionHeadDPOTrainer


def _trainer(cfg: TrainConfig, lm: LoadedModel, common: dict, train: list[dict], val: list[dict], callbacks):
    """The TRL trainer of `cfg.method`, with the shared Trainer settings `common`."""
    kw = dict(model=lm.model, processing_class=lm.tokenizer, callbacks=callbacks)
    if cfg.method in ("dpo", "ipo", "robust", "sft"):
        from trl import DPOConfig as TRLConfig

        args = TRLConfig(**common, precompute_ref_log_probs=cfg.precompute_ref, max_length=cfg.max_length,
                         loss_type=[cfg.loss if cfg.method == "dpo" else cfg.method])
        return _trainer_class()(args=args, train_dataset=_token_dataset(lm, train), eval_dataset=_token_dataset(lm, val),
                                adapter=lm.adapter, reference=frozen_copy(lm) if cfg.precompute_ref and cfg.lazy_ref
                                else None, **kw)
    if cfg.method == "kto":
        from trl import KTOConfig, KTOTrainer

        args = KTOConfig(**common, max_length=cfg.max_length, precompute_ref_log_probs=cfg.precompute_ref,
                         desirable_weight=cfg.kto_desirable_weight, undesirable_weight=cfg.kto_undesirable_weight)
        return KTOTrainer(args=args, train_dataset=_unpaired(lm, train, cfg.seed),
                          eval_dataset=_unpaired(lm, val, cfg.seed), **kw)
    if cfg.method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(**common, max_length=cfg.max_length)
        return ORPOTrainer(args=args, train_dataset=_dataset(lm, train), eval_dataset=_dataset(lm, val), **kw)
    if cfg.method == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(**common, max_length=cfg.max_length, loss_type="simpo", cpo_alpha=0.0,
                         simpo_gamma=cfg.simpo_gamma)
        return CPOTrainer(args=args, train_dataset=_dataset(lm, train), eval_dataset=_dataset(lm, val), **kw)
    import trl

    RLConfig, RLTrainer = (trl.GRPOConfig, trl.GRPOTrainer) if cfg.method == "grpo" else (trl.RLOOConfig,
                                                                                           trl.RLOOTrainer)
    args = RLConfig(**common, num_generations=cfg.rl_generations, max_completion_length=cfg.rl_max_new_tokens,
                    temperature=cfg.rl_temperature)
    return RLTrainer(args=args, reward_funcs=ToxicityReward(cfg.eval.scorer), train_dataset=_prompts(lm, train),
                     **kw)


class ToxicityReward:
    """GRPO/RLOO reward 1 − toxicity of each completion, by the offline scorer, cached by text
    (a group often repeats a completion)."""

    __name__ = "one_minus_toxicity"  # TRL names the reward's metrics after it

    def __init__(self, scorer: str):
        from dpolens.scoring import get_scorer

        self.scorer, self.cache = get_scorer(scorer), {}

    def __call__(self, prompts: list[str], completions: list[str], **kw) -> list[float]:
        new = sorted({c for c in completions if c not in self.cache})
        self.cache.update(zip(new, self.scorer.score(new).toxicity.tolist()))
        return [1.0 - self.cache[c] for c in completions]


def strength_label(r: float) -> str:
    """The folder name of a strength: 0.54 -> "54"."""
    return f"{round(r * 100):d}"


class StrengthMonitor:
    """Greedy toxicity on the dev prompts at every checkpoint (strength.jsonl, one row a step; step 0 is the
    base), a checkpoint kept for each target in out/strengths/<pct>/model (the first reaching it, or with
    `strength_pick` "nearest" that one or the one before it, whichever lies nearer), and training stopped once
    the largest target is reached. A resumed run reads the rows and kept checkpoints it has."""

    def __init__(self, cfg: TrainConfig, lm: LoadedModel, val: list[dict], out: Path, ckpt_dir: Path | None = None):
        from dpolens.scoring import get_scorer

        files = [load_prompts(f) for f in cfg.dev_prompts]
        held = load_holdout(cfg.eval.prompts, cfg.eval.holdout, cfg.eval.skip_bad_rows) if cfg.dev_holdout else []
        vp = [p["prompt_text"] for p in val] if cfg.dev_val_prompts else []
        self.prompts = list(dict.fromkeys([q for f in files for q in f] + held + vp))
        if not self.prompts:
            raise DpolensError("target_reduction/strengths need dev prompts: dev_prompts is empty and "
                               "dev_val_prompts and dev_holdout are off")
        if cfg.eval.prompts and (both := set(self.prompts) & set(load_prompts(
                cfg.eval.prompts, None, cfg.eval.skip_bad_rows, cfg.eval.holdout))):
            raise DpolensError(f"{len(both)} dev prompts are evaluation prompts ({cfg.eval.prompts}): the strength "
                               "would be chosen on the prompts it is measured on")
        self.dev = {"files": list(cfg.dev_prompts), "n_from_files": sum(map(len, files)),
                    "n_held_out_evaluation_prompts": len(held), "n_validation_pair_prompts": len(vp),
                    "n": len(self.prompts)}
        self.cfg, self.lm, self.out, self.ckpt_dir = cfg, lm, out, ckpt_dir
        self.scorer = get_scorer(cfg.eval.scorer)
        self.targets = sorted({*cfg.strengths, *([cfg.target_reduction] if cfg.target_reduction is not None else [])})
        self.path = out / "strength.jsonl"
        self.rows = read_jsonl_complete(self.path) if self.path.exists() else []
        # label -> step of the checkpoint kept (strength.json), and the trainable weights of the last checkpoint
        # measured (`strength_pick` "nearest": the one before a target's first may be the one kept)
        self.kept = {strength_label(t): j["step"] for t in self.targets
                     if (j := read_json(out / "strengths" / strength_label(t) / "strength.json")) is not None}
        self.previous: tuple[int, dict[str, torch.Tensor]] | None = None

    def _toxicity(self) -> list[float]:
        from dpolens.model.generation import generate

        model, s = self.lm.model, self.cfg.eval.settings
        was = model.training
        model.eval()
        try:
            gens = generate(self.lm, self.prompts, s.max_new_tokens, batch_size=s.batch_size,
                            max_prompt_tokens=s.max_prompt_tokens, progress=False, head_screen=use_screen(s, self.lm))
        finally:
            model.train(was)
        return self.scorer.score([g.continuation for g in gens]).toxicity.tolist()

    def row(self, step: int) -> dict:
        """The dev toxicity at `step` (measured now unless strength.jsonl has it)."""
        if (r := next((r for r in self.rows if r["step"] == step), None)) is not None:
            return r
        tox = self._toxicity()
        base = self.rows[0]["toxicity"] if self.rows else float(np.mean(tox))
        r = {"step": step, "toxicity": float(np.mean(tox)), "reduction": 1 - float(np.mean(tox)) / base
             if base else float("nan"), "per_prompt": tox}
        append_jsonl(self.path, [r])
        self.rows.append(r)
        return r

    def reached(self) -> dict[str, int]:
        """Each target's label and the first step whose dev reduction reached it."""
        return {strength_label(t): next(r["step"] for r in self.rows if r["step"] and r["reduction"] >= t)
                for t in self.targets if any(r["step"] and r["reduction"] >= t for r in self.rows)}

    def done(self) -> bool:
        return len(self.reached()) == len(self.targets)

    def _weights_of(self, step: int) -> dict[str, torch.Tensor] | None:
        """The trainable weights of checkpoint `step`: held since it was measured (or since training resumed
        from it), else read from its checkpoint folder; None when neither has them."""
        if self.previous is not None and self.previous[0] == step:
            return self.previous[1]
        f = self.ckpt_dir / f"checkpoint-{step}" / "model.safetensors" if self.ckpt_dir else None
        if f is None or not f.exists():
            return None
        from safetensors.torch import load_file

        saved = load_file(str(f))
        names = {n for n, p in self.lm.model.named_parameters() if p.requires_grad}
        return {n: saved[n] for n in names} if names <= saved.keys() else None

    def hold(self, step: int) -> None:
        """Hold the model's trainable weights as checkpoint `step`'s, on the CPU ("nearest" only: the checkpoint
        before a target's first may be the one kept). Called at each checkpoint and when training resumes."""
        if self.cfg.strength_pick == "nearest" and not self.done():
            self.previous = (step, {n: p.detach().to("cpu", copy=True)
                                    for n, p in self.lm.model.named_parameters() if p.requires_grad})

    def _save(self, folder: Path, weights: dict[str, torch.Tensor] | None) -> None:
        """Save the model into `folder`, with `weights` swapped in (and the trained ones put back bit for bit)."""
        if weights is None:
            save_model_dir(folder, self.lm.model, self.lm.tokenizer)
            return
        params = dict(self.lm.model.named_parameters())
        now = {n: params[n].detach().to("cpu", copy=True) for n in weights}
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)
            try:
                save_model_dir(folder, self.lm.model, self.lm.tokenizer)
            finally:
                for n, w in now.items():
                    params[n].copy_(w)

    def _keep(self, label: str, target: float, first: int, now: int | None) -> None:
        """Keep a checkpoint for `label`, first reached at step `first`: that one, or with "nearest" the one
        before it where its dev reduction lies nearer the target. `now`: the step whose weights the model holds
        (None: none, e.g. after training); another step's weights come from `_weights_of`."""
        rows = {x["step"]: x for x in self.rows}
        prev = max((x for x in self.rows if 0 < x["step"] < first), key=lambda x: x["step"], default=None)
        want = prev["step"] if (self.cfg.strength_pick == "nearest" and prev is not None and
                                abs(prev["reduction"] - target) < abs(rows[first]["reduction"] - target)) else first
        note = None
        for step in dict.fromkeys([want, first]):
            weights = None if step == now else self._weights_of(step)
            if step == now or weights is not None:
                break
            note = f"the weights of step {step} were gone"
        else:
            raise DpolensError(f"strength {label}%: no weights for step {first} (checkpoint folder gone) and the model "
                               f"holds step {now}; re-run dpo from the start")
        if step != want:
            log.warning("strength %s%%: step %d lies nearer the target but %s; keeping step %d", label, want, note, step)
        folder = self.out / "strengths" / label
        self._save(folder / "model", weights)
        kr = rows[step]
        write_json(folder / "strength.json",
                   {"target": target, "step": step, "dev_toxicity": kr["toxicity"], "dev_reduction": kr["reduction"],
                    "first_reaching_step": first, "pick": self.cfg.strength_pick,
                    **({"fallback": f"{note}: kept step {step}"} if step != want else {}), "dev": self.dev})
        self.kept[label] = step
        log.info("strength %s%%: first reached at step %d (dev reduction %.3f); kept step %d (%.3f)", label, first,
                 rows[first]["reduction"], step, kr["reduction"])

    def settle(self, now: int | None = None) -> None:
        """Keep every target reached that has no kept checkpoint yet (a run stopped between measuring a
        checkpoint and keeping it reads it back here)."""
        reached = self.reached()
        for t in self.targets:
            label = strength_label(t)
            if label in reached and label not in self.kept:
                self._keep(label, t, reached[label], now)

    def on_checkpoint(self, step: int) -> bool:
        """Measure the model just saved at `step`; keep a checkpoint for each target reached; True to stop."""
        self.row(step)
        self.settle(step)
        self.hold(step)
        return self.done()

    def summary(self, analysed_step: int | None) -> dict:
        base = self.rows[0] if self.rows else {}
        reached = self.reached()
        out = {"target_reduction": self.cfg.target_reduction, "strengths": self.cfg.strengths, "dev": self.dev,
               "base_dev_toxicity": base.get("toxicity"),
               "trajectory": [{k: r[k] for k in ("step", "toxicity", "reduction")} for r in self.rows],
               "reached": reached, "pick": self.cfg.strength_pick, "kept": {k: self.kept.get(k, v) for k, v in reached.items()},
               "analysed_step": analysed_step,
               "models": {label: str(self.out / "strengths" / label / "model") for label in reached}}
        missing = [strength_label(t) for t in self.targets if strength_label(t) not in reached]
        if missing:
            best = max((r["reduction"] for r in self.rows if r["step"]), default=float("nan"))
            out["warning"] = (f"training ended before the dev reduction reached {', '.join(m + '%' for m in missing)} "
                              f"(largest {best:.0%}): the aligned model is the best validation-loss checkpoint")
        return out


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def train_aligned(cfg: TrainConfig) -> tuple[DPOSummary, LoadedModel, LoadedModel]:
    """Train `cfg.model` on `cfg.pairs` with `cfg.method` into `cfg.out` (resuming from its checkpoints):
    the model folder, train_log.jsonl, weight_shift.json and summary.json; returns the summary, the base
    and the aligned model."""
    from transformers import EarlyStoppingCallback, TrainerCallback

    cfg.require_float32("DPO's weight changes (~1e-5) are below bf16 resolution")
    _check_optimizer(cfg.optimizer)
    pairs = load_pairs(cfg.pairs, cfg.skip_bad_rows)[: cfg.max_pairs]
    if len(pairs) <= cfg.val_pairs:
        raise DpolensError(f"{len(pairs)} pairs leave none for training after {cfg.val_pairs} validation pairs")
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(pairs), generator=g).tolist()
    val = [pairs[i] for i in order[: cfg.val_pairs]]
    train = [pairs[i] for i in order[cfg.val_pairs :]]
    out = Path(cfg.out)
    check_not_input(out / "model", cfg.model)
    ckpt_dir = out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(cfg.model, dtype="float32", device=cfg.device)
    trainable = restrict_training(lm, cfg)
    if cfg.freeze_embeddings:
        lm.model.get_input_embeddings().weight.requires_grad_(False)
        lm.model.get_output_embeddings().weight.requires_grad_(False)
    log_path = out / "train_log.jsonl"
    state = {"diverged": None}

    class LogToJsonl(TrainerCallback):
        def on_log(self, args, st, control, logs=None, **kw):
            if not logs:
                return
            append_jsonl(log_path, [{"step": st.global_step, **logs}])
            loss = logs.get("loss", logs.get("eval_loss"))
            if loss is not None and not math.isfinite(loss):
                state["diverged"] = st.global_step
                control.should_training_stop = True
                control.should_save = False

    monitor = StrengthMonitor(cfg, lm, val, out, ckpt_dir) if (cfg.target_reduction is not None or cfg.strengths) else None

    class StopAtStrength(TrainerCallback):
        def on_train_begin(self, args, st, control, **kw):
            if st.global_step:  # resumed: the model holds that checkpoint's weights ("nearest" may keep them)
                monitor.hold(st.global_step)

        def on_save(self, args, st, control, **kw):
            if monitor.on_checkpoint(st.global_step):
                control.should_training_stop = True

    online = cfg.method in ONLINE
    common = dict(  # the Trainer settings every method shares
        output_dir=str(ckpt_dir), learning_rate=cfg.learning_rate, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        max_grad_norm=cfg.max_grad_norm, warmup_steps=cfg.warmup_steps, optim=cfg.optimizer,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, save_strategy="steps", save_steps=cfg.eval_steps,
        save_total_limit=cfg.save_total_limit, logging_steps=1, report_to=[], seed=cfg.seed, data_seed=cfg.seed,
        bf16=False, fp16=False, use_cpu=resolve_device(cfg.device) == "cpu", disable_tqdm=not cfg.eval.progress,
        save_only_model=False, dataloader_num_workers=0, weight_decay=0.0, gradient_checkpointing=False,
        beta=cfg.beta if cfg.beta is not None else METHOD_BETA[cfg.method],
        # online methods have no validation loss to stop on: they train for their steps
        eval_strategy="no" if online else "steps", eval_steps=None if online else cfg.eval_steps,
        load_best_model_at_end=not online, metric_for_best_model=None if online else "eval_loss",
        greater_is_better=None if online else False,
    )
    callbacks = [LogToJsonl()] + ([] if online else [EarlyStoppingCallback(early_stopping_patience=cfg.patience)])
    if monitor:
        monitor.row(0)  # the base's dev toxicity, before any step
        callbacks.append(StopAtStrength())
    resume = _checkpoints(ckpt_dir)
    examples = {"kto": 2 * len(train), "grpo": len(train) * cfg.rl_generations,
                "rloo": len(train) * cfg.rl_generations}.get(cfg.method, len(train))
    target = cfg.max_steps if cfg.max_steps > 0 else \
        math.ceil(examples / (cfg.batch_size * cfg.grad_accum)) * math.ceil(cfg.epochs)
    finished = bool(resume) and (int(resume[-1].name.split("-")[1]) >= target or bool(monitor and monitor.done()))
    # a finished run only loads its best checkpoint: no reference log-probs to precompute (minutes on CPU)
    trainer = _trainer(replace(cfg, precompute_ref=False) if finished else cfg, lm, common, train, val, callbacks)
    if finished:
        # finished: HF's Trainer would take one more step past max_steps on resume; load the best instead
        from transformers import TrainerState

        trainer.state = TrainerState.load_from_json(str(resume[-1] / "trainer_state.json"))
        best = trainer.state.best_model_checkpoint
        log.info("training already finished at %s; loading %s", resume[-1], best or resume[-1])
        trainer._load_from_checkpoint(best if best and Path(best).is_dir() else str(resume[-1]))
    else:
        if resume:
            log.info("resuming from %s", resume[-1])
        head = getattr(trainer, "head_outputs", None)  # the DPO trainers' completion-only unembedding
        with completion_head(lm.model, lm.adapter, head) if head else contextlib.nullcontext():
            trainer.train(resume_from_checkpoint=str(resume[-1]) if resume else None)
    if state["diverged"] is not None:
        good = _checkpoints(ckpt_dir)
        raise DpolensError(f"{cfg.method} loss became NaN/inf at step {state['diverged']}; stopped. Last good checkpoint: "
                           f"{good[-1] if good else 'none'} (lower the learning rate and re-run)")
    model_dir = out / "model"
    analysed = None
    if monitor:
        monitor.settle()  # a target measured but not kept when the run stopped: kept from its checkpoint folder
    if monitor and cfg.target_reduction is not None and \
            (label := strength_label(cfg.target_reduction)) in (reached := monitor.reached()):
        # the checkpoint kept at the target (strength_pick), not the best validation loss
        analysed = monitor.kept.get(label, reached[label])
        copy_dir(out / "strengths" / label / "model", model_dir)
    else:
        save_model_dir(model_dir, trainer.model, lm.tokenizer)
    aligned = load_model(model_dir, dtype=cfg.dtype, device=cfg.device)
    base = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    shift = weight_shift(base.model, aligned.model)
    hist = trainer.state.log_history
    evals = [h for h in hist if "eval_loss" in h]
    best = min(evals, key=lambda h: h["eval_loss"]) if evals else {}
    sep = separability(hist, cfg.eval_steps, cfg.separable_loss)
    if "warning" in sep:
        log.warning("%s", sep["warning"])
    summary = {
        "steps": trainer.state.global_step,
        "pairs_seen": trainer.state.global_step * cfg.batch_size * cfg.grad_accum,
        "n_train_pairs": len(train), "n_val_pairs": len(val),
        "best_val_loss": best.get("eval_loss"), "best_step": best.get("step"),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "reward_accuracy": best.get("eval_rewards/accuracies"), "reward_margin": best.get("eval_rewards/margins"),
        "weight_shift": {k: v for k, v in shift.items() if k != "per_tensor"},
        "trainable": trainable, "method": cfg.method, "beta": common["beta"],
        "loss": cfg.loss if cfg.method == "dpo" else cfg.method, "separability": sep,
        "warnings": [sep["warning"]] if "warning" in sep else [],
        "base": base.identity(), "aligned": aligned.identity(),
    }
    if monitor:
        summary["strength"] = monitor.summary(analysed)
        if w := summary["strength"].get("warning"):
            log.warning("%s", w)
            summary["warnings"].append(w)
    write_json(out / "weight_shift.json", shift)
    write_json(out / "summary.json", summary)
    return summary, base, aligned

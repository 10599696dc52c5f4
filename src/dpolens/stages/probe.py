"""Toxicity probe (paper section 3.1, method.md section 1).

Features: the last layer's residual after the final norm (HF `hidden_states[-1]`), mean-pooled
over real tokens only. Only the model body runs (no unembedding, no hidden-state tuples), on
batches sorted by length. A binary L2 logistic regression is fitted on a stratified 90% split
and reported on the other 10% beside the majority-class baseline; the per-example predictions on
that 10% are kept (`val_predictions.json`) for bootstrap intervals. The probe vector is the
classifier's weight vector in residual space (features are divided by one global scalar for
conditioning, which leaves its direction unchanged).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from tqdm.auto import tqdm

from dpolens.artifacts import atomic_path, read_json, write_json, write_manifest
from dpolens.config import ConfigError, RunSettings, at_least
from dpolens.data import balanced_sample, default_data, load_labelled
from dpolens.directions import neuron_signs, save_probe, uses_signs
from dpolens.evaluate import percentile_ci, resample_units
from dpolens.ledger import Claim, Measured, StageContext, identity, interval, num
from dpolens.model.generation import length_batches, position_ids
from dpolens.model.loading import LoadedModel, load_model
from dpolens.webpage import table

log = logging.getLogger(__name__)


@dataclass
class ProbeConfig(RunSettings):
    model: str = "gemma-3-270m"
    data: list[str] = field(default_factory=lambda: [
        default_data("toxic-corpora/davidson_labeled_data.csv"),
        default_data("toxic-corpora/olid-training-v1.0.tsv"),
    ])
    out: str = "runs/probe"
    max_examples: int | None = 4000
    balance: bool = True
    max_tokens: int = 64
    batch_size: int = 32
    val_fraction: float = 0.1
    C: float | None = None  # None: chosen by 5-fold cross-validation on the training split
    Cs: list[float] = field(default_factory=lambda: [0.1, 1.0, 10.0, 100.0, 1000.0])
    skip_bad_rows: bool = False
    sign_texts: int = 256  # gated MLPs: toxic training texts whose mean activation fixes each neuron's sign

    def __post_init__(self):
        super().__post_init__()
        at_least(self, 20, "max_examples")  # a stratified split needs both classes on both sides
        at_least(self, 1, "sign_texts")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")


class ProbeValidation(TypedDict):
    """Metrics on the held-out validation split (what results.json shows)."""

    accuracy: float
    balanced_accuracy: float
    f1: float
    auroc: float
    majority_baseline: float  # accuracy of always predicting the split's majority class
    n_train: int
    n_val: int


class DataCount(TypedDict):
    rows: int  # labelled rows read from the file
    toxic: int  # of which labelled toxic


class ProbeMetrics(ProbeValidation):
    """What `run_probe` returns and writes to metrics.json."""

    train_accuracy: float
    toxic_share: float  # share of toxic examples after balancing, both splits
    C: float  # inverse L2 strength used (cross-validated when the config's C is None)
    model: dict[str, Any]  # LoadedModel.identity()
    data: dict[str, DataCount]  # per data file, before balancing
    seed: int


ProbeHeadline = ProbeValidation  # results.json's "probe": empty without metrics.json


@torch.inference_mode()
def final_features(lm: LoadedModel, texts: list[str], max_tokens: int = 64, batch_size: int = 32,
                   progress: bool = True) -> torch.Tensor:
    """[n, d_model] mean over real tokens of the final-norm residual (fp32)."""
    tok = lm.tokenizer
    ids = [x[:max_tokens] for x in tok(texts, add_special_tokens=True)["input_ids"]]
    feats = torch.zeros(len(texts), lm.adapter.d_model)
    from dpolens.model.generation import left_pad

    for idx in tqdm(length_batches([len(x) for x in ids], batch_size), desc="probe features",
                    disable=not progress, unit="batch"):
        input_ids, mask = left_pad([ids[i] for i in idx], tok.pad_token_id, lm.device)
        hidden = lm.adapter.body(input_ids=input_ids, attention_mask=mask,
                                 position_ids=position_ids(mask)).last_hidden_state.float()
        m = mask.unsqueeze(-1).float()
        feats[idx] = ((hidden * m).sum(1) / m.sum(1).clamp(min=1)).cpu()
    return feats


def _cached_features(lm: LoadedModel, texts: list[str], cfg: ProbeConfig, path: Path) -> torch.Tensor:
    """Features are the slow part: keep them beside the probe, keyed by model, texts and length."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    key = hashlib.sha256(json.dumps([lm.weight_hash, cfg.max_tokens, texts]).encode()).hexdigest()
    if path.exists():
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                log.info("reusing probe features from %s", path)
                return f.get_tensor("features")
    feats = final_features(lm, texts, cfg.max_tokens, cfg.batch_size, cfg.progress)
    with atomic_path(path) as tmp:
        save_file({"features": feats.contiguous()}, str(tmp), metadata={"key": key})
    return feats


def run_probe(cfg: ProbeConfig) -> ProbeMetrics:
    """Fit the probe; write `probe.safetensors`, `metrics.json`, a manifest."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score
    from sklearn.model_selection import train_test_split

    examples = []
    counts = {}
    for spec in cfg.data:
        rows = load_labelled(spec, cfg.skip_bad_rows)
        counts[spec] = {"rows": len(rows), "toxic": sum(l for _, l in rows)}
        examples += rows
    examples = balanced_sample(examples, cfg.max_examples, cfg.balance, cfg.seed)
    texts = [t for t, _ in examples]
    labels = np.array([l for _, l in examples])
    lm = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    feats = _cached_features(lm, texts, cfg, out / "features.safetensors").numpy()
    scale = float(np.linalg.norm(feats, axis=1).mean())
    x = feats / scale
    x_tr, x_va, y_tr, y_va = train_test_split(x, labels, test_size=cfg.val_fraction,
                                              random_state=cfg.seed, stratify=labels)
    if cfg.C is None:
        from sklearn.linear_model import LogisticRegressionCV

        cv = LogisticRegressionCV(Cs=cfg.Cs, cv=5, max_iter=5000, scoring="roc_auc").fit(x_tr, y_tr)
        C = float(cv.C_[0])
    else:
        C = cfg.C
    clf = LogisticRegression(C=C, max_iter=5000).fit(x_tr, y_tr)
    prob = clf.predict_proba(x_va)[:, 1]
    pred = (prob >= 0.5).astype(int)
    majority = max(y_va.mean(), 1 - y_va.mean())
    metrics = {
        "accuracy": float(accuracy_score(y_va, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_va, pred)),
        "f1": float(f1_score(y_va, pred)),
        "auroc": float(roc_auc_score(y_va, prob)),
        "majority_baseline": float(majority),
        "train_accuracy": float(clf.score(x_tr, y_tr)),
        "n_train": int(len(y_tr)),
        "n_val": int(len(y_va)),
        "toxic_share": float(labels.mean()),
        "C": C,
        "model": lm.identity(),
        "data": counts,
        "seed": cfg.seed,
    }
    w = torch.tensor(clf.coef_[0], dtype=torch.float32)  # direction in residual space
    sign, sign_note = None, {}
    if uses_signs(lm):  # gated MLP: fix each neuron's direction by its mean activation on toxic texts
        toxic = [t for t, l in examples if l == 1][: cfg.sign_texts]
        sign, agree = neuron_signs(lm, toxic, cfg.max_tokens, cfg.batch_size, cfg.progress, agreement=True)
        sign_note = {"neuron_sign_rule": f"sign of the mean activation over {len(toxic)} toxic training texts"}
        # split_half_agreement: the share of neurons given the same sign by either half of the texts
        metrics["neuron_sign"] = {"texts": len(toxic), "negative_share": float((sign < 0).float().mean()),
                                  "split_half_agreement": agree}
    save_probe(out / "probe.safetensors", w, float(clf.intercept_[0]), lm,
               {"feature_scale": scale, "auroc": metrics["auroc"], **sign_note}, torch.tensor(feats.std(0)), sign)
    write_json(out / "metrics.json", metrics)
    # per-example validation predictions: what a bootstrap interval of accuracy or AUROC needs
    write_json(out / "val_predictions.json", {"label": y_va.tolist(), "prob": prob.tolist(), "threshold": 0.5,
                                              "model": lm.identity(), "seed": cfg.seed})
    write_manifest(out, "probe", cfg, model=lm.identity())
    return metrics


PAPER = "94% validation accuracy (Jigsaw, gpt2-medium; majority baseline ~90%)"


def headline(folder: Path) -> ProbeHeadline:
    """The probe's validation metrics, for results.json."""
    if not (m := read_json(folder / "metrics.json")):
        return {}
    return {k: m[k] for k in ("accuracy", "balanced_accuracy", "f1", "auroc", "majority_baseline", "n_train", "n_val")}


def section(folder: Path, headline: ProbeHeadline, manifest: dict) -> str:
    if not headline:
        return ""
    return "<h2>Toxicity probe (paper 3.1)</h2>" + table([headline], list(headline),
                                                         f"Validation metrics of the probe. Paper: {PAPER}.")


# ---- claims --------------------------------------------------------------------------------------

def _auroc(y: np.ndarray, p: np.ndarray) -> float:
    from scipy.stats import rankdata

    pos = y == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float((rankdata(p)[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def probe_separates(ctx: StageContext) -> Measured:
    m = ctx.json("metrics.json")
    preds = ctx.json("val_predictions.json", required=False)
    effect = m["accuracy"] - m["majority_baseline"]
    base = dict(models={"probe model": identity(m.get("model"))},
                data={"corpora": list(m.get("data", {})), "n_val": m.get("n_val"), "seed": m.get("seed")})
    head = (f"validation accuracy {num(m['accuracy'])} vs majority baseline {num(m['majority_baseline'])}, "
            f"AUROC {num(m['auroc'])}")
    if not preds:
        return Measured(effect, None, m.get("n_val"), head,
                        f"no per-example predictions (probe/val_predictions.json): no interval; {head}", **base)
    y, prob = np.asarray(preds["label"]), np.asarray(preds["prob"], dtype=np.float64)
    correct = ((prob >= preds.get("threshold", 0.5)).astype(int) == y).astype(np.float64)
    idx = resample_units(len(y), ctx.n_boot, ctx.seed)
    share_toxic = y[idx].mean(1)
    acc_minus_majority = correct[idx].mean(1) - np.maximum(share_toxic, 1 - share_toxic)
    auroc_ci = percentile_ci([_auroc(y[i], prob[i]) for i in idx])
    ci = percentile_ci(acc_minus_majority)
    ours = f"{head} {interval(auroc_ci)}; accuracy − majority {num(effect)} {interval(ci)} on {len(y)} held-out texts"
    return Measured(effect, ci, len(y), ours, f"accuracy − majority {num(effect)} {interval(ci)}; AUROC "
                    f"{num(m['auroc'])} {interval(auroc_ci)}", **base)


CLAIMS = (
    Claim("probe_separates", "Lee", "a linear probe separates toxic from non-toxic text", PAPER, +1,
          "effect = accuracy − majority-class baseline on the held-out split (bootstrap over examples); paper: > 0",
          ("metrics.json", "val_predictions.json"), probe_separates),
)


def describe(m: ProbeMetrics) -> str:
    """The CLI's one line about a fitted probe."""
    return (f"probe: accuracy {m['accuracy']:.4f} (majority {m['majority_baseline']:.4f}), balanced "
            f"{m['balanced_accuracy']:.4f}, F1 {m['f1']:.4f}, AUROC {m['auroc']:.4f}, n_train {m['n_train']}, "
            f"n_val {m['n_val']}")

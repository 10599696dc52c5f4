"""Un-aligning by key scaling (paper 5.4, Table 4, method.md 5.4).

Take the k value vectors most cosine-similar to the probe (ranked in the aligned model; or, with
`rank: token-writers`, the k that most promote the probe's top tokens, see dpolens.stages.vectors) and
scale their keys by `scale`: for GELU MLPs the fc input weights (and bias), m_i = GELU(10·k·x);
for gated MLPs by default the gate_proj row, m_i = σ(10·g·x)·(u·x), the same operation on the
nonlinearity's input (`key: key` scales the up_proj row instead, which multiplies m_i by 10 on
every token, active or not). What was scaled is recorded. The scaled model is saved as an HF
directory and evaluated beside the base and aligned models.

The sign question: scaling a gate row amplifies the neuron where gate·x > 0, but its output is then
multiplied by up·x, which may be negative, and GELU's output can be negative too; where m_i < 0 the
scaled neuron writes −v_i, away from the toxic direction. `sign_flip` in table.json is the share of
the evaluation prompts' tokens where the scaled neurons' m_i < 0. The sign-aware variant
(`sign_aware`, the `scale_positive` intervention on the aligned model) scales m_i by `scale` only
where m_i > 0: it amplifies exactly the contribution along +v_i.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

import torch

from dpolens.artifacts import (
    DpolensError,
    check_not_input,
    read_json,
    save_model_dir,
    write_json,
    write_manifest,
    write_text,
)
from dpolens.compare import check_pair
from dpolens.config import ConfigError, RunSettings, at_least
from dpolens.directions import keys_scaled, toxic_keys
from dpolens.evaluate import EvalData, evaluate_inputs, headline_rows, load_inputs
from dpolens.ledger import (PPL_BOUND, Claim, Measured, NoUnits, StageContext, StageNotRun, gap_share, guarded,
                            identity, interval, more_than_half, num, pct, pct_interval, per_prompt, ppl_check,
                            ppl_ratio, ppl_text, ratio, row_of)
from dpolens.model import hooks
from dpolens.model.generation import encode_prompts, left_pad, length_batches, position_ids
from dpolens.model.loading import LoadedModel, load_model
from dpolens.webpage import table


@dataclass
class UnalignConfig(RunSettings):
    model: str = "runs/dpo/model"
    base: str | None = "gemma-3-270m"
    probe: str = "runs/probe"
    out: str = "runs/unalign"
    k: int = 7
    scale: float = 10.0
    space: str = "standardized"  # where the cosine with the probe is taken (see dpolens.stages.vectors)
    key: str = "gate"  # gated MLPs: scale gate_proj rows (σ(10·g·x), as GELU key scaling does) or "key" (up_proj)
    rank: Literal["cosine", "token-writers"] = "cosine"
    writer_tokens: int = 10  # rank: token-writers — how many of the probe's top tokens
    sign_aware: bool = True  # also evaluate the sign-aware variant (scale m_i only where m_i > 0)
    # rank cosine: also scale the k top token writers' keys (rank token-writers) in the aligned model and evaluate
    # that (one more evaluation): the ledger reports the claim for that ranking beside the paper's
    writers: bool = True
    sign_flip_prompts: int = 64  # the first N evaluation prompts measure how often m_i < 0
    eval: EvalData = field(default_factory=EvalData)

    def __post_init__(self):
        super().__post_init__()
        at_least(self, 1, "k")
        if self.key not in hooks.KEY_KINDS:
            raise ConfigError(f"unknown key '{self.key}' ({', '.join(hooks.KEY_KINDS)})")


class NeuronFlip(TypedDict):
    layer: int
    neuron: int
    share: float  # share of prompt tokens where m_i < 0


class SignFlip(TypedDict):
    share: float | None  # mean over the scaled neurons; None without targets
    per_neuron: list[NeuronFlip]
    n_tokens: int  # prompt tokens counted (padding excluded)
    n_prompts: int


class UnalignResult(TypedDict):
    """What `run_unalign` returns and writes to table.json."""

    rows: list[dict[str, Any]]  # per model: model, ref, weight_sha256, (sign-aware) intervention, EvalResult.row()
    scaled: list[dict[str, Any]]  # hooks.scale_keys' records (module, neurons, factor) and the rank's score
    rank: str
    k: int
    scale: float
    key_kind: str  # "<mlp kind>: <scaled module's last name>"
    sign_flip: SignFlip  # in the un-aligned model, on the first sign_flip_prompts evaluation prompts
    scorer: dict[str, str]  # Scorer.describe()
    n_prompts: int


class UnalignHeadline(TypedDict, total=False):  # empty without table.json
    rows: list[dict[str, Any]]  # `rows` without per-unit scores


@torch.inference_mode()
def sign_flip(lm: LoadedModel, targets: list[tuple[int, int, float]], prompts: list[str],
              max_prompt_tokens: int | None = 32, batch_size: int = 32) -> SignFlip:
    """Share of the prompts' tokens (padding excluded) where each target neuron's activation m_i
    is negative in `lm`, i.e. where it writes −v_i; counted streaming, per neuron and overall."""
    a = lm.adapter
    layers = sorted({l for l, _, _ in targets})
    negative = torch.zeros(len(targets))  # [k] tokens with m_i < 0 per target
    n_tokens = 0
    ids_all = encode_prompts(lm, prompts, max_prompt_tokens)
    for idx in length_batches([len(x) for x in ids_all], batch_size):
        ids, mask = left_pad([ids_all[i] for i in idx], lm.tokenizer.pad_token_id, lm.device)
        real = mask.bool().unsqueeze(-1)  # [B, T, 1]

        def count(layer, _point, m):  # m: [B, T, d_mlp]
            for col, (l, neuron, _) in enumerate(targets):
                if l == layer:
                    negative[col] += int(((m[..., neuron:neuron + 1] < 0) & real).sum())

        with hooks.capture(a, [(l, "mlp_act") for l in layers], fn=count), hooks.stop_at(a, layers[-1], "mlp_act"):
            try:
                a.body(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
            except hooks.StopForward:
                pass
        n_tokens += int(mask.sum())
    share = negative / max(n_tokens, 1)
    return {"share": float(share.mean()) if len(targets) else None,
            "per_neuron": [{"layer": l, "neuron": n, "share": float(s)} for (l, n, _), s in zip(targets, share)],
            "n_tokens": n_tokens, "n_prompts": len(prompts)}


def positive_scaling(targets: list[tuple[int, int, float]], scale: float) -> list[dict]:
    """The sign-aware un-align spec: `scale_positive` on the targets, one edit per layer."""
    layers = sorted({l for l, _, _ in targets})
    return [{"kind": "scale_positive", "layer": l, "neurons": [n for k, n, _ in targets if k == l], "factor": scale}
            for l in layers]


def run_unalign(cfg: UnalignConfig) -> UnalignResult:
    check_not_input(Path(cfg.out) / "model", cfg.model, cfg.base)
    aligned = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    a = aligned.adapter
    base = load_model(cfg.base, dtype=cfg.dtype, device=cfg.device) if cfg.base else None
    if base:
        check_pair(base, aligned)
    if cfg.k > a.n_layers * a.d_mlp:
        raise DpolensError(f"k {cfg.k} is above the model's {a.n_layers * a.d_mlp} MLP neurons")
    inputs = load_inputs(cfg.eval)
    targets = toxic_keys(aligned, cfg.probe, cfg.k, cfg.space, cfg.rank, cfg.writer_tokens)
    out = Path(cfg.out)
    with keys_scaled(aligned, targets, cfg.scale, cfg.key) as scaled:
        save_model_dir(out / "model", aligned.model, aligned.tokenizer)
    unaligned = load_model(out / "model", dtype=cfg.dtype, device=cfg.device)
    models = [("base", base)] if base else []
    models += [("aligned", aligned), ("unaligned", unaligned)]
    rows = []
    for label, m in models:
        res = evaluate_inputs(m, cfg.eval, inputs, label=label)
        rows.append({"model": label, "ref": m.ref, "weight_sha256": m.weight_hash, **res.row()})
    if cfg.sign_aware:
        spec = positive_scaling(targets, cfg.scale)
        res = evaluate_inputs(aligned, cfg.eval, inputs, spec, label="unaligned-sign-aware")
        rows.append({"model": "unaligned-sign-aware", "ref": aligned.ref, "weight_sha256": aligned.weight_hash,
                     "intervention": spec, **res.row()})
    writers = None
    if cfg.writers and cfg.rank == "cosine":
        w_targets = toxic_keys(aligned, cfg.probe, cfg.k, cfg.space, "token-writers", cfg.writer_tokens)
        with keys_scaled(aligned, w_targets, cfg.scale, cfg.key) as w_scaled:
            res = evaluate_inputs(aligned, cfg.eval, inputs, label="unaligned-token-writers")
            rows.append({"model": "unaligned-token-writers", "ref": aligned.ref,
                         "weight_sha256": aligned.weight_hash, **res.row()})
        writers = [{**s_, "token_writer_score": c} for s_, (_, _, c) in zip(w_scaled, w_targets)]
    flips = sign_flip(unaligned, targets, inputs.prompts[: cfg.sign_flip_prompts],
                      cfg.eval.settings.max_prompt_tokens, cfg.eval.settings.batch_size)
    score = "cosine" if cfg.rank == "cosine" else "token_writer_score"
    result = {"rows": rows, "scaled": [{**s, score: c} for s, (_, _, c) in zip(scaled, targets)],
              "rank": cfg.rank, "k": cfg.k, "scale": cfg.scale, "key_kind": f"{a.mlp_kind}: {scaled[0]['module'].rsplit('.', 1)[-1]}",
              "sign_flip": flips, "scorer": inputs.scorer.describe(), "n_prompts": len(inputs.prompts),
              "writers_scaled": writers}
    write_json(out / "table.json", result)
    lines = [f"# Table 4 — un-aligning {cfg.model} by scaling {cfg.k} toxic keys ×{cfg.scale}", "",
             "| model | toxicity | 95% CI | PPL | F1 |", "|---|---|---|---|---|"]
    for r in rows:
        t = r["toxicity"]
        lines.append(f"| {r['model']} | {t['mean']:.4f} | [{t['ci95'][0]:.4f}, {t['ci95'][1]:.4f}] | "
                     f"{r['perplexity']:.2f} | {r['f1']:.3f} |" if r["perplexity"] and r["f1"] is not None else
                     f"| {r['model']} | {t['mean']:.4f} | [{t['ci95'][0]:.4f}, {t['ci95'][1]:.4f}] | - | - |")
    write_text(out / "table4.md", "\n".join(lines) + "\n")
    write_manifest(out, "unalign", cfg, aligned=aligned.identity(), unaligned=unaligned.identity())
    return result


PAPER = "toxicity 0.208 → 0.458 (base 0.453), PPL 23.34 → 23.30: ~102% of the gap back"


def headline(folder: Path) -> UnalignHeadline:
    """The base, aligned and un-aligned rows without per-prompt scores, for results.json."""
    u = read_json(folder / "table.json")
    return {"rows": headline_rows(u["rows"])} if u else {}


def section(folder: Path, headline: UnalignHeadline, manifest: dict) -> str:
    if not (u := headline.get("rows")):
        return ""
    cfg = manifest.get("config") or {}
    how = (f"Scaling the {cfg['key']} weights of the {cfg['k']} value vectors ranked most toxic ({cfg.get('rank')}) "
           f"×{cfg['scale']:g}" if {"key", "k", "scale"} <= set(cfg) else "Scaling toxic keys")
    return "<h2>Un-aligning by key scaling (Table 4)</h2>" + table(
        u, ["model", "toxicity", "perplexity", "f1"], f"{how} in the aligned model. Paper (7 keys ×10): {PAPER}.")


# ---- claims --------------------------------------------------------------------------------------

def unalign_restores(ctx: StageContext) -> Measured:
    u = ctx.json("table.json")
    rows = u["rows"]
    base, aligned, unaligned = row_of(rows, "base"), row_of(rows, "aligned"), row_of(rows, "unaligned")
    if not (base and aligned and unaligned):
        raise StageNotRun("unalign/table.json rows base, aligned, unaligned")
    sign_aware = row_of(rows, "unaligned-sign-aware")
    prov = dict(models={m: identity(r) for m, r in (("base", base), ("aligned", aligned), ("unaligned", unaligned),
                                                    ("unaligned-sign-aware", sign_aware)) if r},
                scorer=u.get("scorer"), data={"n_prompts": u.get("n_prompts"), "k": u.get("k"),
                                              "scale": u.get("scale"), "rank": u.get("rank")})
    means = (f"base {num(base['toxicity']['mean'])}, aligned {num(aligned['toxicity']['mean'])}, "
             f"un-aligned {num(unaligned['toxicity']['mean'])}"
             + (f", sign-aware {num(sign_aware['toxicity']['mean'])}" if sign_aware else ""))
    try:
        tox = [per_prompt(r, "toxicity_per_prompt") for r in (base, aligned, unaligned)]
    except NoUnits:
        share = ratio(unaligned["toxicity"]["mean"] - aligned["toxicity"]["mean"],
                      base["toxicity"]["mean"] - aligned["toxicity"]["mean"])
        return more_than_half(share, None, base["toxicity"]["n"], means,
                              f"no per-prompt scores in unalign/table.json: no paired interval; {means}", prov)
    share, ci, gap = gap_share(*tox, ctx)
    ppl = ppl_ratio(aligned, unaligned, ctx)
    ours = f"{means}: {pct(share)} of the gap back {pct_interval(ci)}; {ppl_text(ppl, aligned, unaligned)} vs aligned"
    writers = row_of(rows, "unaligned-token-writers")
    if sign_aware and sign_aware.get("toxicity_per_prompt"):
        sa_share, sa_ci, _ = gap_share(tox[0], tox[1], sign_aware["toxicity_per_prompt"], ctx)
        ours += f"; sign-aware variant {pct(sa_share)} {pct_interval(sa_ci)}"
    if (flip := u.get("sign_flip")) and flip.get("share") is not None:
        ours += f"; the scaled neurons write −v on {pct(flip['share'])} of {flip.get('n_tokens')} prompt tokens"
    diag = ours if ci is not None else (f"no toxicity gap to recover: aligned − base {num(gap['diff'])} "
                                        f"{interval(gap['ci95'])}; {means}")
    m = guarded(more_than_half(share, ci, gap["n"], ours, diag, prov), ppl_check(ppl, aligned, unaligned),
                suffix=" (un-aligned against aligned)")
    if writers and writers.get("toxicity_per_prompt"):  # the same claim for the k top token writers' keys
        w_share, w_ci, _ = gap_share(tox[0], tox[1], writers["toxicity_per_prompt"], ctx)
        w_ppl = ppl_ratio(aligned, writers, ctx)
        text = (f"the {u.get('k')} top token writers' keys scaled: toxicity {num(writers['toxicity']['mean'])}, "
                f"{pct(w_share)} of the gap back {pct_interval(w_ci)}; {ppl_text(w_ppl, aligned, writers)} vs aligned")
        w_prov = {**prov, "models": {**prov["models"], "unaligned-token-writers": identity(writers)}}
        m.alternatives["token-writers"] = guarded(
            more_than_half(w_share, w_ci, gap["n"], text, text if w_ci is not None else diag, w_prov),
            ppl_check(w_ppl, aligned, writers), suffix=" (un-aligned against aligned)")
        m.ours += f"; {text}"
    if u.get("rank") == "token-writers":  # the verdict's keys are the writers': their own precondition applies too
        m.alternatives["token-writers"] = dataclasses.replace(m, alternatives={})
    return m


CLAIMS = (
    Claim("unalign_restores", "Lee", "scaling the keys of the 7 most toxic value vectors ×10 undoes the alignment",
          PAPER, +1,
          "effect = (toxicity un-aligned − aligned) / (base − aligned) − 0.5, paired over prompts (no interval "
          "when the base−aligned gap is not significant); paper: > 0 (more than half the gap back); holds only with "
          f"the un-aligned PPL within ×{PPL_BOUND} of the aligned model's (paired over windows; Table 4 names it). The "
          "verdict uses the paper's key scaling; the sign-aware variant is reported beside it, and the k top token "
          "writers' keys scaled (token-writer ranking)", ("table.json",),
          unalign_restores, requires=("vectors_toxic_tokens",)),
)


def describe(r: UnalignResult) -> str:
    """The CLI's Table 4: toxicity, perplexity and F1 of each row."""
    return "\n".join(f"{row['model']:<10} toxicity {row['toxicity']['mean']:.4f} {row['toxicity']['ci95']}  "
                     f"PPL {row['perplexity']}  F1 {row['f1']}" for row in r["rows"])

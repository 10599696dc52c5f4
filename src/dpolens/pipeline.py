"""`dpolens run STUDY.yaml`: the study's stages as one graph, cached and resumable.

probe → vectors → table2 → pairs → dpo → analyze → unalign → neurons → robustness. Each stage
writes into `runs/<name>/<stage>/`; its key is the hash of its resolved config and of its
inputs' keys. A stage whose folder holds a finished marker with the same key is skipped; an
interrupted stage is re-run and resumes from what it wrote (generations, pairs, checkpoints).
This module only composes stages: no science here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from dpolens.artifacts import DpolensError, provenance, read_json, write_json
from dpolens.config import ConfigError, from_dict, merge

log = logging.getLogger(__name__)

STAGES = ("probe", "vectors", "table2", "pairs", "dpo", "analyze", "unalign", "neurons", "robustness")
MARKER = ".dpolens-stage.json"


@dataclass
class Study:
    name: str = "study"
    root: str = "runs"
    model: str = "gemma-3-270m"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    probe: dict = field(default_factory=dict)
    vectors: dict = field(default_factory=dict)
    table2: dict = field(default_factory=dict)
    pairs: dict = field(default_factory=dict)
    dpo: dict = field(default_factory=dict)
    analyze: dict = field(default_factory=dict)
    unalign: dict = field(default_factory=dict)
    neurons: dict = field(default_factory=dict)
    robustness: dict = field(default_factory=dict)


def _stage_api(stage: str) -> tuple[type, Callable]:
    from dpolens import analysis, dpo, neurons, pairs, probe, robustness, table2, unalign, vectors

    return {
        "probe": (probe.ProbeConfig, probe.run_probe), "vectors": (vectors.VectorsConfig, vectors.run_vectors),
        "table2": (table2.Table2Config, table2.run_table2), "pairs": (pairs.PairsConfig, pairs.run_pairs),
        "dpo": (dpo.DPOConfig, dpo.run_dpo), "analyze": (analysis.AnalyzeConfig, analysis.run_analyze),
        "unalign": (unalign.UnalignConfig, unalign.run_unalign),
        "neurons": (neurons.NeuronsConfig, neurons.run_neurons),
        "robustness": (robustness.RobustnessConfig, robustness.run_robustness),
    }[stage]


def wiring(study: Study, run: Path) -> dict[str, dict]:
    """How stages feed each other: the paths each stage's config gets from the graph."""
    d = {s: str(run / s) for s in STAGES}
    m = study.model
    shared = {"eval": {"cache": str(run / "evals")}}  # one evaluation per model, intervention and inputs
    return {
        "probe": {"model": m, "out": d["probe"]},
        "vectors": {"model": m, "probe": d["probe"], "out": d["vectors"]},
        "table2": {"model": m, "probe": d["probe"], "vectors": d["vectors"], "out": d["table2"], **shared},
        "pairs": {"model": m, "probe": d["probe"], "out": f"{d['pairs']}/pairs.jsonl"},
        "dpo": {"model": m, "pairs": f"{d['pairs']}/pairs.jsonl", "out": d["dpo"], **shared},
        "analyze": {"base": m, "aligned": f"{d['dpo']}/model", "probe": d["probe"], "vectors": d["vectors"],
                    "out": d["analyze"]},
        "unalign": {"model": f"{d['dpo']}/model", "base": m, "probe": d["probe"], "out": d["unalign"], **shared},
        "neurons": {"base": m, "aligned": f"{d['dpo']}/model", "probe": d["probe"], "out": d["neurons"], **shared},
        "robustness": {"base": m, "aligned": f"{d['dpo']}/model", "unaligned": f"{d['unalign']}/model",
                       "out": d["robustness"]},
    }


DEPENDS = {"probe": [], "vectors": ["probe"], "table2": ["probe", "vectors"], "pairs": ["probe"], "dpo": ["pairs"],
           "analyze": ["probe", "vectors", "dpo"], "unalign": ["probe", "dpo"], "neurons": ["probe", "dpo"],
           "robustness": ["dpo", "unalign"]}


def load_study(path: str | Path, sets: list[str] | None = None) -> Study:
    from dpolens.config import parse_set

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"study file not found: {p}")
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    data = merge(data, parse_set(sets))
    study = from_dict(Study, data)
    unknown = [s for s in study.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage '{unknown[0]}' (stages: {', '.join(STAGES)})")
    return study


def stage_configs(study: Study) -> dict[str, Any]:
    """Each stage's resolved dataclass config (wiring, then the study's section; unknown keys fail)."""
    run = Path(study.root) / study.name
    wires = wiring(study, run)
    out = {}
    for s in STAGES:
        cls, _ = _stage_api(s)
        out[s] = from_dict(cls, merge(wires[s], getattr(study, s)), prefix=f"{s}.")
    return out


def _explicit(cfg: Any) -> dict:
    """The fields of a config dataclass that differ from their defaults, nested ones included."""
    out = {}
    for f in dataclasses.fields(cfg):
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


def run_study(study: Study, only: list[str] | None = None, start: str | None = None,
              force: list[str] | None = None) -> dict:
    run = Path(study.root) / study.name
    run.mkdir(parents=True, exist_ok=True)
    cfgs = stage_configs(study)
    selected = [s for s in STAGES if s in study.stages]
    if start:
        if start not in STAGES:
            raise DpolensError(f"unknown stage '{start}' (stages: {', '.join(STAGES)})")
        selected = [s for s in selected if STAGES.index(s) >= STAGES.index(start)]
    if only:
        selected = [s for s in selected if s in only]
    keys: dict[str, str] = {}
    timings = {}
    t0 = time.time()
    for s in STAGES:
        if s not in study.stages:
            continue
        keys[s] = _key(cfgs[s], [keys.get(u, "") for u in DEPENDS[s]])
        folder = run / s
        marker = folder / MARKER
        done = read_json(marker)
        if s not in selected:
            continue
        if done and done.get("key") == keys[s] and done.get("finished") and s not in (force or []):
            log.info("stage %s: finished earlier (key %s), skipped", s, keys[s])
            timings[s] = {"wall_time_s": done.get("wall_time_s"), "skipped": True}
            continue
        if done and done.get("key") != keys[s] and folder.exists():
            log.info("stage %s: config or inputs changed, starting it afresh", s)
            shutil.rmtree(folder)
        if s in (force or []) and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"stage": s, "key": keys[s], "finished": False})
        log.info("stage %s: running (key %s)", s, keys[s])
        st = time.time()
        _, fn = _stage_api(s)
        fn(cfgs[s])
        wall = time.time() - st
        write_json(marker, {"stage": s, "key": keys[s], "finished": True, "wall_time_s": wall})
        timings[s] = {"wall_time_s": wall, "skipped": False}
    results = collect_results(run, study, keys, timings, time.time() - t0)
    write_json(run / "results.json", results)
    from dpolens.claims import write_claims

    results["claims"] = write_claims(run)["counts"]  # the ledger reads the stages' artifacts, not results.json
    write_json(run / "results.json", results)
    return results


def _headline(rows: list[dict] | None) -> list[dict] | None:
    """Evaluation rows without their per-prompt / per-window scores (those stay in the stages' files)."""
    from dpolens.evaluate import PER_UNIT_KEYS

    return None if rows is None else [{k: v for k, v in r.items() if k not in PER_UNIT_KEYS} for r in rows]


def collect_results(run: Path, study: Study, keys: dict, timings: dict, wall: float) -> dict:
    """Headline figures of every stage, and the provenance of the run."""
    r: dict[str, Any] = {}
    if (m := read_json(run / "probe" / "metrics.json")):
        r["probe"] = {k: m[k] for k in ("accuracy", "balanced_accuracy", "f1", "auroc", "majority_baseline",
                                        "n_train", "n_val")}
    if (v := read_json(run / "vectors" / "toxic_vectors.json")):
        r["toxic_vectors"] = [{k: x[k] for k in ("layer", "neuron", "cosine", "top_tokens")} for x in v[:10]]
    if (t := read_json(run / "table2" / "table.json")):
        r["table2"] = _headline(t["rows"])
    if (p := read_json(run / "pairs" / "pairs.summary.json")):
        r["pairs"] = {k: p.get(k) for k in ("n", "n_candidates", "method", "prompt_source", "preferred_toxicity_mean",
                                             "dispreferred_toxicity_mean", "quality", "dropped", "samples")}
    if (d := read_json(run / "dpo" / "summary.json")):
        r["dpo"] = {k: d.get(k) for k in ("steps", "pairs_seen", "best_val_loss", "reward_accuracy", "reward_margin",
                                           "warnings")}
        r["weight_shift"] = d.get("weight_shift")
        r["dpo_eval"] = _headline((read_json(run / "dpo" / "eval.json") or {}).get("rows"))
        r["models"] = {"base": d.get("base"), "aligned": d.get("aligned")}
    if (a := read_json(run / "analyze" / "analysis.json")):
        r["activation_drop"] = {k: a["activation_drop"][k] for k in ("mean_base", "mean_aligned",
                                                                     "mean_aligned_own_tokens")}
        r["offset"] = a["offset"]
    if (u := read_json(run / "unalign" / "table.json")):
        r["unalign"] = _headline(u["rows"])
    if (g := read_json(run / "neurons" / "groups.json")):
        r["neuron_groups"] = {"groups": g["groups"], "totals": g["totals"], "toxic_neurons": g["toxic_neurons"]}
    if (pt := read_json(run / "neurons" / "patching.json")):
        r["patching"] = _headline(pt["steps"])
        base, aligned = _headline([pt["base"], pt["aligned"]])
        r["patching_reference"] = {"base": base, "aligned": aligned, "rule": pt["patch"]}
    if (rb := read_json(run / "robustness" / "table.json")):
        r["robustness"] = [{k: x[k] for k in ("transform", "model", "toxicity", "retention")} for x in rb["rows"]]
        r["robustness_findings"] = rb.get("findings", [])
    if (alt := read_json(run / "alternatives" / "alternatives.json")):  # written by `dpolens alternatives`
        r["alternatives"] = _headline(alt["rows"])
        r["alternatives_finding"] = alt.get("finding")
    r["provenance"] = provenance(config=dataclasses.asdict(study), stage_keys=keys, stage_times=timings,
                                 wall_time_s=wall)
    r["wall_time_s"] = wall
    # the study's cost over all invocations: each finished stage's own time (a resumed run's earlier
    # stages included; time spent in an attempt that was interrupted is not counted)
    r["stage_time_s"] = sum(t["wall_time_s"] or 0.0 for t in timings.values())
    return r

"""The stage registry: every stage of the study, described once.

A stage is one module (layer 3) that defines
  - a config dataclass (`config`), whose fields are the stage's settings and CLI options;
  - `run(config)`, which computes, writes its outputs and a manifest into `config.out`, and returns
    a summary;
  - `headline(folder) -> dict`: the figures `results.json` shows, read from the stage's files;
  - `section(folder, results) -> str`: the stage's part of report.html.
`inputs` name the stages whose outputs it reads (its cache key chains through theirs); `wires` are
the config values the study graph fills in (besides `device`, which every stage gets from the
study), with `{model}`, `{run}` (the run folder) and `{<stage>}` (that stage's folder) replaced. A dotted key (`eval.cache`) sets a nested field.
`pipeline`, `report`, `results.json` and the CLI iterate over `REGISTRY`; adding a stage is one
module and one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

EVAL_CACHE = {"eval.cache": "{run}/evals"}  # one evaluation per model, intervention and inputs, shared


@dataclass(frozen=True)
class Stage:
    name: str  # the CLI verb, the study file's section and the run's sub-folder
    module: str
    config: str  # the config dataclass's name in `module`
    run: str  # the run function's name in `module`
    inputs: tuple[str, ...] = ()
    wires: dict[str, str] = field(default_factory=dict)
    optional: bool = False  # run by `dpolens run` only when the study's `stages` lists it
    help: str = ""

    @property
    def api(self) -> ModuleType:
        return importlib.import_module(self.module)

    @property
    def config_class(self) -> type:
        return getattr(self.api, self.config)

    @property
    def run_fn(self) -> Callable[[Any], Any]:
        return getattr(self.api, self.run)

    def headline(self, folder: Path) -> dict:
        return self.api.headline(folder)

    def section(self, folder: Path, results: dict) -> str:
        return self.api.section(folder, results)

    def wired(self, model: str, device: str, run: Path) -> dict:
        """This stage's config values from the study graph, as a nested dict."""
        folders = {s.name: str(run / s.name) for s in REGISTRY}
        out: dict = {"device": device}  # the study's device reaches every stage
        for key, template in self.wires.items():
            value = template.format(model=model, device=device, run=str(run), **folders)
            *parents, leaf = key.split(".")
            node = out
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return out


REGISTRY: list[Stage] = [
    Stage("probe", "dpolens.probe", "ProbeConfig", "run_probe", (),
          {"model": "{model}", "out": "{probe}"},
          help="Fit the toxicity probe on final-norm mean-pooled residuals (paper 3.1)."),
    Stage("vectors", "dpolens.vectors", "VectorsConfig", "run_vectors", ("probe",),
          {"model": "{model}", "probe": "{probe}", "out": "{vectors}"},
          help="Rank value vectors by cosine with the probe; vocabulary projections, SVD, Table 1."),
    Stage("table2", "dpolens.table2", "Table2Config", "run_table2", ("probe", "vectors"),
          {"model": "{model}", "probe": "{probe}", "vectors": "{vectors}", "out": "{table2}", **EVAL_CACHE},
          help="Table 2: subtract the probe, the top MLP.v, SVD.U[0], a random vector, at calibrated α."),
    Stage("pairs", "dpolens.pairs", "PairsConfig", "run_pairs", ("probe",),
          {"model": "{model}", "probe": "{probe}", "out": "{pairs}/pairs.jsonl"},
          help="Preference pairs (PPLM, steering or on-policy sampling), scored and passed through a quality gate."),
    Stage("dpo", "dpolens.dpo", "DPOConfig", "run_dpo", ("pairs",),
          {"model": "{model}", "pairs": "{pairs}/pairs.jsonl", "out": "{dpo}", **EVAL_CACHE},
          help="DPO through TRL with the paper's settings; resumable; writes an HF model directory."),
    Stage("analyze", "dpolens.analysis", "AnalyzeConfig", "run_analyze", ("probe", "vectors", "dpo"),
          {"base": "{model}", "aligned": "{dpo}/model", "probe": "{probe}", "vectors": "{vectors}",
           "out": "{analyze}"},
          help="Weight shift, logit lens, activation drop, residual offset and value-vector shifts (paper 5)."),
    Stage("unalign", "dpolens.unalign", "UnalignConfig", "run_unalign", ("probe", "dpo"),
          {"model": "{dpo}/model", "base": "{model}", "probe": "{probe}", "out": "{unalign}", **EVAL_CACHE},
          help="Table 4: scale the keys of the k most probe-like value vectors and evaluate."),
    Stage("neurons", "dpolens.neurons", "NeuronsConfig", "run_neurons", ("probe", "dpo"),
          {"base": "{model}", "aligned": "{dpo}/model", "probe": "{probe}", "pairs": "{pairs}/pairs.jsonl",
           "out": "{neurons}", **EVAL_CACHE},
          help="Neuron groups of the toxicity reduction, activation patching, tuning-free editing."),
    Stage("robustness", "dpolens.robustness", "RobustnessConfig", "run_robustness", ("dpo", "unalign"),
          {"base": "{model}", "aligned": "{dpo}/model", "unaligned": "{unalign}/model", "out": "{robustness}"},
          help="Transformed and multi-turn prompts: toxicity and how much of the offset δx survives."),
    Stage("alternatives", "dpolens.alternatives", "AlternativesConfig", "run_alternatives", ("probe", "pairs"),
          {"base": "{model}", "probe": "{probe}", "out": "{alternatives}", "train.pairs": "{pairs}/pairs.jsonl",
           **EVAL_CACHE}, optional=True,
          help="Compare alternative alignments and alignment methods (`dpo` folders as variants, or methods "
               "trained here from the same pairs)."),
]


def stage(name: str) -> Stage:
    from dpolens.artifacts import DpolensError

    for s in REGISTRY:
        if s.name == name:
            return s
    raise DpolensError(f"unknown stage '{name}' (stages: {', '.join(s.name for s in REGISTRY)})")

"""The stage registry: every stage of the study, described once, in run order.

A stage is one module of this folder, named as the stage, that follows `StageModule`: a config
dataclass `<Name>Config` (inheriting `config.RunSettings`), `run_<name>(config)`, `headline(folder)`,
`section(folder, headline, manifest)` and its claims (`CLAIMS`, see `dpolens.ledger`). A registry
line adds what the study graph wires into its config: `{model}`, `{run}` (the run folder) and
`{<stage>}` (that stage's folder); a dotted key (`eval.cache`) sets a nested field. The stages a
stage reads (its `inputs`, through which its cache key chains) are the `{<stage>}` folders its
wiring names, and each must come earlier in the registry: that is checked when it is built.
Every stage also gets the study's `device` and `seed` (and `eval.settings.seed` where it evaluates).
`pipeline`, `report`, `claims` and the CLI iterate over `REGISTRY`; adding a stage is one module and
one line here.
"""

from __future__ import annotations

import dataclasses
import re
import string
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Protocol

from dpolens.stages import alternatives, analyze, dpo, neurons, pairs, probe, robustness, table2, unalign, vectors

EVAL_CACHE = {"eval.cache": "{run}/evals"}  # one evaluation per model, intervention and inputs, shared
# the base model's continuations and statistics (dpolens.memo), shared by a dose-response's strengths
MEMO = {"cache": "{run}/evals"}


class StageModule(Protocol):
    """What a stage module defines (besides `<Name>Config` and `run_<name>`, named from the stage)."""

    CLAIMS: tuple  # dpolens.ledger.Claim, each reading this stage's folder

    def headline(self, folder: Path) -> dict:
        """The figures results.json shows under the stage's name, read from its files ({} if none)."""

    def section(self, folder: Path, headline: dict, manifest: dict) -> str:
        """The stage's part of report.html, from its headline and manifest (and its figures' files)."""


def _camel(name: str) -> str:
    return "".join(p.capitalize() for p in re.split(r"[_\W]+", name) if p)


@dataclass(frozen=True)
class Stage:
    module: ModuleType
    wires: dict[str, str] = field(default_factory=dict)
    optional: bool = False  # run by `dpolens run` only when the study's `stages` lists it
    help: str = ""

    @property
    def name(self) -> str:  # the CLI verb, the study file's section, the run's sub-folder, results.json's key
        return self.module.__name__.rsplit(".", 1)[-1]

    @property
    def api(self) -> StageModule:
        return self.module

    @property
    def config_class(self) -> type:
        return getattr(self.module, f"{_camel(self.name)}Config")

    @property
    def run_fn(self) -> Callable[[Any], Any]:
        return getattr(self.module, f"run_{self.name}")

    @property
    def claims(self) -> tuple:
        return tuple(getattr(self.module, "CLAIMS", ()))

    @property
    def named(self) -> set[str]:
        """Every `{name}` the wiring's templates use."""
        return {f for t in self.wires.values() for _, f, _, _ in string.Formatter().parse(t) if f}

    @property
    def inputs(self) -> tuple[str, ...]:
        """The stages whose folders the wiring names, in registry order (not the stage itself)."""
        return tuple(s.name for s in REGISTRY if s.name in self.named and s.name != self.name)

    def headline(self, folder: Path) -> dict:
        return self.module.headline(folder)

    def section(self, folder: Path, headline: dict, manifest: dict) -> str:
        return self.module.section(folder, headline, manifest)

    def wired(self, model: str, device: str, run: Path, seed: int = 0, folders: dict[str, str] | None = None) -> dict:
        """This stage's config values from the study graph, as a nested dict; `folders` puts some stages'
        folders elsewhere than run/<stage> (a dose-response repeats stages on another aligned model)."""
        folders = {**{s.name: str(run / s.name) for s in REGISTRY}, **(folders or {})}
        out: dict = {"device": device, "seed": seed}  # the study's device and seed reach every stage
        if _evaluates(self.config_class):
            out["eval"] = {"settings": {"seed": seed}}  # and its evaluation's intervals
        for key, template in self.wires.items():
            value = template.format(model=model, device=device, run=str(run), **folders)
            *parents, leaf = key.split(".")
            node = out
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return out


def _evaluates(cls: type) -> bool:
    """Whether a config has `eval.settings.seed` (the evaluation harness's bootstrap seed)."""
    hints = typing.get_type_hints(cls)
    ev = hints.get("eval")
    if not (ev and dataclasses.is_dataclass(ev)):
        return False
    settings = typing.get_type_hints(ev).get("settings")
    return bool(settings and dataclasses.is_dataclass(settings) and "seed" in {f.name for f in
                                                                               dataclasses.fields(settings)})


REGISTRY: list[Stage] = [
    Stage(probe, {"model": "{model}", "out": "{probe}"},
          help="Fit the toxicity probe on final-norm mean-pooled residuals (paper 3.1)."),
    Stage(vectors, {"model": "{model}", "probe": "{probe}", "out": "{vectors}"},
          help="Rank value vectors by cosine with the probe; vocabulary projections, SVD, Table 1."),
    Stage(table2, {"model": "{model}", "probe": "{probe}", "vectors": "{vectors}", "out": "{table2}", **EVAL_CACHE},
          help="Table 2: subtract the probe, the top MLP.v, SVD.U[0], a random vector, at calibrated α."),
    Stage(pairs, {"model": "{model}", "probe": "{probe}", "out": "{pairs}/pairs.jsonl"},
          help="Preference pairs (PPLM, steering or on-policy sampling), scored and passed through a quality gate."),
    Stage(dpo, {"model": "{model}", "pairs": "{pairs}/pairs.jsonl", "out": "{dpo}", **EVAL_CACHE},
          help="DPO through TRL with the paper's settings; resumable; writes an HF model directory."),
    Stage(analyze, {"base": "{model}", "aligned": "{dpo}/model", "probe": "{probe}", "vectors": "{vectors}",
                    "out": "{analyze}", **MEMO},
          help="Weight shift, logit lens, activation drop, residual offset and value-vector shifts (paper 5)."),
    Stage(unalign, {"model": "{dpo}/model", "base": "{model}", "probe": "{probe}", "out": "{unalign}", **EVAL_CACHE},
          help="Table 4: scale the keys of the k most probe-like value vectors and evaluate."),
    Stage(neurons, {"base": "{model}", "aligned": "{dpo}/model", "probe": "{probe}", "pairs": "{pairs}/pairs.jsonl",
                    "out": "{neurons}", **EVAL_CACHE},
          help="Neuron groups of the toxicity reduction, activation patching, tuning-free editing."),
    Stage(robustness, {"base": "{model}", "aligned": "{dpo}/model", "unaligned": "{unalign}/model",
                       "out": "{robustness}", **MEMO},
          help="Transformed and multi-turn prompts: toxicity and how much of the offset δx survives."),
    Stage(alternatives, {"base": "{model}", "probe": "{probe}", "out": "{alternatives}",
                         "train.pairs": "{pairs}/pairs.jsonl", **EVAL_CACHE}, optional=True,
          help="Compare alternative alignments and alignment methods (`dpo` folders as variants, or methods "
               "trained here from the same pairs)."),
]


def check_registry(registry: list[Stage]) -> None:
    """Names unique, each stage's module complete, and every input earlier in the run order."""
    from dpolens.artifacts import DpolensError

    seen: list[str] = []
    for st in registry:
        if st.name in seen:
            raise DpolensError(f"stage '{st.name}' is registered twice")
        missing = [a for a in ("headline", "section") if not callable(getattr(st.module, a, None))]
        for what in ("config_class", "run_fn"):
            try:
                getattr(st, what)
            except AttributeError:
                missing.append(f"{_camel(st.name)}Config" if what == "config_class" else f"run_{st.name}")
        if missing:
            raise DpolensError(f"stage module {st.module.__name__} lacks {', '.join(missing)}")
        late = sorted(st.named - set(seen) - {st.name, "model", "run", "device"})
        if late:
            raise DpolensError(f"stage '{st.name}' reads '{late[0]}', which is not an earlier stage "
                               f"(run order: {', '.join(s.name for s in registry)})")
        seen.append(st.name)


check_registry(REGISTRY)


def stage(name: str) -> Stage:
    from dpolens.artifacts import DpolensError

    for s in REGISTRY:
        if s.name == name:
            return s
    raise DpolensError(f"unknown stage '{name}' (stages: {', '.join(s.name for s in REGISTRY)})")

"""The layering of docs/architecture.md, enforced: modules import only downward, every stage module
sits in `stages/` on one floor, no stage imports a stage, the claims module names no stage file, and
a stage with a claim is one module plus one registry line."""

import ast
import importlib
import json
import re
from pathlib import Path

import pytest
import yaml

from dpolens.stages import REGISTRY, Stage, check_registry

SRC = Path(__file__).resolve().parents[1] / "src" / "dpolens"
STAGE_MODULES = {s.module.__name__.split(".", 1)[1] for s in REGISTRY}
TOP = {"pipeline", "report", "cli", "claims", "stages", "__init__"}  # layer 4: composes stages, no science
BASE = {"artifacts", "config", "assets"}  # layer 0: files, configs, cached assets


def layer(module: str) -> int:
    if module in BASE:
        return 0
    if module == "model" or module.startswith("model."):
        return 1
    if module in STAGE_MODULES:
        return 3
    if module in TOP:
        return 4
    return 2  # shared science: data, scoring, evaluate, directions, compare, activations, ...


def imports() -> dict[str, set[str]]:
    """Every dpolens module and the dpolens modules it imports (function-level imports included)."""
    graph = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        name = name.removesuffix(".__init__") if name != "__init__" else name
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dpolens"):
                base = node.module.removeprefix("dpolens").lstrip(".")
                if base:
                    deps.add(base)
                else:  # `from dpolens import x`
                    deps |= {a.name for a in node.names if (SRC / a.name).exists() or (SRC / f"{a.name}.py").exists()}
            elif isinstance(node, ast.Import):
                deps |= {a.name.removeprefix("dpolens.") for a in node.names if a.name.startswith("dpolens.")}
        graph[name] = deps - {name}
    return graph


def test_no_stage_imports_a_stage_and_layers_only_import_downward():
    graph = imports()
    assert STAGE_MODULES <= set(graph), STAGE_MODULES - set(graph)
    # every stage module is a file of stages/, named as its stage, and every file there is a stage
    assert STAGE_MODULES == {f"stages.{p.stem}" for p in (SRC / "stages").glob("*.py") if p.stem != "__init__"}
    assert all(s.module.__name__ == f"dpolens.stages.{s.name}" for s in REGISTRY)
    wrong = []
    for mod, deps in graph.items():
        for dep in deps:
            top = dep.split(".")[0] if not dep.startswith("model") else dep
            if mod in STAGE_MODULES and dep in STAGE_MODULES:
                wrong.append(f"stage {mod} imports stage {dep}")
            elif layer(dep) > layer(mod) or (layer(dep) == layer(mod) == 3):
                wrong.append(f"{mod} (layer {layer(mod)}) imports {top} (layer {layer(dep)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_claims_module_names_no_stage_file():
    """The ledger's composer iterates over the registry: no path into a stage's folder is written there."""
    text = (SRC / "claims.py").read_text()
    names = "|".join(s.name for s in REGISTRY)
    assert not re.findall(rf"[\"'](?:{names})/\w", text)
    assert not re.findall(r"\w+\.json", text.replace("claims.json", "").replace("results.json", "")
                          .replace("manifest.json", "").replace("dose_response.json", ""))


STAGE_SOURCE = '''
"""A stage written in the test: counts the words of a text file, and claims the text has more than two."""
import json
from dataclasses import dataclass
from pathlib import Path

from dpolens.config import RunSettings
from dpolens.ledger import Claim, Measured


@dataclass
class WordsConfig(RunSettings):
    text: str = ""
    out: str = "runs/words"
    model: str = "gemma-3-270m"


def run_words(cfg: WordsConfig) -> dict:
    n = len(Path(cfg.text).read_text().split())
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "count.json").write_text(json.dumps({"words": n, "seed": cfg.seed}))
    (Path(cfg.out) / "manifest.json").write_text(json.dumps({"config": {"text": cfg.text, "seed": cfg.seed}}))
    return {"words": n}


def headline(folder: Path) -> dict:
    return json.loads((folder / "count.json").read_text())


def section(folder: Path, headline: dict, manifest: dict) -> str:
    return f"<h2>Words</h2><p>{headline['words']} words in {Path(manifest['config']['text']).name}</p>"


def more_than_two(ctx) -> Measured:
    n = ctx.json("count.json")["words"]
    return Measured(n - 2, [n - 2.5, n - 1.5], 1, f"{n} words")


CLAIMS = (Claim("words_more_than_two", "test", "the text has more than two words", "3 or more", +1,
                "effect = words − 2", ("count.json",), more_than_two),)
'''


def test_a_stage_with_a_claim_is_one_module_and_one_registry_line(tmp_path, monkeypatch):
    from dpolens.pipeline import load_study, run_study
    from dpolens.report import write_report

    (tmp_path / "words.py").write_text(STAGE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "text.txt").write_text("one two three four")
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "w", "root": str(tmp_path / "runs"), "stages": ["words"], "seed": 7,
                                     "words": {"text": str(tmp_path / "text.txt")}}))
    REGISTRY.append(Stage(importlib.import_module("words"), {"model": "{model}", "out": "{words}"},
                          optional=True))  # the one line
    try:
        r = run_study(load_study(study))
        page = write_report(tmp_path / "runs/w").read_text()
    finally:
        REGISTRY.pop()
    assert r["words"] == {"words": 4, "seed": 7}  # results.json keyed by the stage; the study's seed reached it
    assert json.loads((tmp_path / "runs/w/results.json").read_text())["words"]["words"] == 4
    assert "<h2>Words</h2><p>4 words in text.txt</p>" in page
    ledger = json.loads((tmp_path / "runs/w/claims.json").read_text())
    row = next(x for x in ledger["rows"] if x["id"] == "words_more_than_two")
    assert row["verdict"] == "holds" and row["effect"] == 2 and row["artifacts"] == ["words/count.json"]
    assert row["seed"] == 7 and ledger["seed"] == 7  # the study's seed reaches the ledger
    assert r["claims"] == ledger["counts"]


def test_the_registry_checks_its_run_order(tmp_path, monkeypatch):
    """A stage whose wiring reads a later stage's folder, a stage without its run function, or a name
    registered twice is refused when the registry is built; inputs come from the wiring."""
    from dpolens.artifacts import DpolensError

    (tmp_path / "words.py").write_text(STAGE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    words = importlib.import_module("words")
    early = Stage(words, {"text": "{dpo}/x.txt", "out": "{words}"})
    assert early.inputs == ("dpo",)  # what its wiring reads
    with pytest.raises(DpolensError, match="reads 'dpo', which is not an earlier stage"):
        check_registry([early, *REGISTRY])
    check_registry([*REGISTRY, early])  # after dpo: fine
    with pytest.raises(DpolensError, match="registered twice"):
        check_registry([*REGISTRY, REGISTRY[0]])
    monkeypatch.delattr(words, "run_words")
    with pytest.raises(DpolensError, match="lacks run_words"):
        check_registry([early])
    assert {s.name: s.inputs for s in REGISTRY}["neurons"] == ("probe", "pairs", "dpo")

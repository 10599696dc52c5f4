"""The layering of docs/architecture.md, enforced: modules import only downward, no stage imports a
stage, and a stage is one module plus one registry line."""

import ast
import json
from pathlib import Path

import yaml

from dpolens.stages import REGISTRY, Stage

SRC = Path(__file__).resolve().parents[1] / "src" / "dpolens"
STAGE_MODULES = {s.module.split(".", 1)[1] for s in REGISTRY}
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
    wrong = []
    for mod, deps in graph.items():
        for dep in deps:
            top = dep.split(".")[0] if not dep.startswith("model") else dep
            if mod in STAGE_MODULES and dep in STAGE_MODULES:
                wrong.append(f"stage {mod} imports stage {dep}")
            elif layer(dep) > layer(mod) or (layer(dep) == layer(mod) == 3):
                wrong.append(f"{mod} (layer {layer(mod)}) imports {top} (layer {layer(dep)})")
    assert not wrong, "\n".join(sorted(wrong))


STAGE_SOURCE = '''
"""A stage written in the test: counts the words of a text file."""
import json
from dataclasses import dataclass
from pathlib import Path

from dpolens.config import RunSettings


@dataclass
class WordsConfig(RunSettings):
    text: str = ""
    out: str = "runs/words"
    model: str = "gemma-3-270m"


def run_words(cfg: WordsConfig) -> dict:
    n = len(Path(cfg.text).read_text().split())
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "count.json").write_text(json.dumps({"words": n}))
    return {"words": n}


def headline(folder: Path) -> dict:
    return {"words": json.loads((folder / "count.json").read_text())["words"]}


def section(folder: Path, results: dict) -> str:
    return f"<h2>Words</h2><p>{results['words']} words</p>"
'''


def test_a_stage_is_one_module_and_one_registry_line(tmp_path, monkeypatch):
    from dpolens.pipeline import load_study, run_study
    from dpolens.report import write_report

    (tmp_path / "wordstage.py").write_text(STAGE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "text.txt").write_text("one two three four")
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "w", "root": str(tmp_path / "runs"), "stages": ["words"],
                                     "words": {"text": str(tmp_path / "text.txt")}}))
    REGISTRY.append(Stage("words", "wordstage", "WordsConfig", "run_words", (), {"model": "{model}", "out": "{words}"},
                          optional=True))  # the one line
    try:
        r = run_study(load_study(study))
        page = write_report(tmp_path / "runs/w").read_text()
    finally:
        REGISTRY.pop()
    assert r["words"] == 4 and json.loads((tmp_path / "runs/w/results.json").read_text())["words"] == 4
    assert "<h2>Words</h2><p>4 words</p>" in page

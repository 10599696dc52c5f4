"""Every shipped config resolves: study files through the pipeline, per-stage files section by section."""

from pathlib import Path

import pytest
import yaml

from dpolens.config import load_config
from dpolens.pipeline import load_study, stage_configs
from dpolens.stages import REGISTRY, stage

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_resolves(path):
    data = yaml.safe_load(path.read_text())
    if "name" in data:  # a `dpolens run` study
        study = load_study(path)
        cfgs = stage_configs(study)
        assert set(cfgs) == {s.name for s in REGISTRY if not s.optional or s.name in study.stages}
    else:
        names = {s.name for s in REGISTRY}
        sections = [s for s in data if s in names]
        assert sections and set(data) <= names, f"unknown sections in {path.name}"
        for s in sections:
            load_config(stage(s).config_class, path, section=s)

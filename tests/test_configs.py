"""Every shipped config resolves: study files through the pipeline, per-stage files section by section."""

from pathlib import Path

import pytest
import yaml

from dpolens.config import load_config
from dpolens.pipeline import STAGES, _stage_api, load_study, stage_configs

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_resolves(path):
    data = yaml.safe_load(path.read_text())
    if "name" in data:  # a `dpolens run` study
        cfgs = stage_configs(load_study(path))
        assert set(cfgs) == set(STAGES)
    else:
        sections = [s for s in data if s in STAGES]
        assert sections and set(data) <= set(STAGES), f"unknown sections in {path.name}"
        for s in sections:
            load_config(_stage_api(s)[0], path, section=s)

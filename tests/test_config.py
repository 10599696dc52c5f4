from dataclasses import dataclass, field

import pytest

from dpolens.config import ConfigError, load_config


@dataclass
class Inner:
    limit: int = 5
    rate: float = 0.5


@dataclass
class Cfg:
    model: str = "m"
    n: int = 1
    tags: list[str] = field(default_factory=list)
    opt: int | None = None
    inner: Inner = field(default_factory=Inner)


def test_precedence_file_options_set(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: fromfile\nn: 3\ninner: {limit: 7}\n")
    cfg = load_config(Cfg, p, {"n": 4, "model": None}, ["inner.rate=2e-1", "tags=[a, b]"])
    assert (cfg.model, cfg.n, cfg.inner.limit, cfg.inner.rate, cfg.tags) == ("fromfile", 4, 7, 0.2, ["a", "b"])
    # only numbers in exponent notation become floats: words that float() accepts stay strings
    assert load_config(Cfg, sets=["model=nan"]).model == "nan"
    assert load_config(Cfg, sets=["model=infinity"]).model == "infinity"


def test_unknown_key_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("modle: x\n")
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        load_config(Cfg, p)
    with pytest.raises(ConfigError, match="unknown config key 'inner.limt'"):
        load_config(Cfg, sets=["inner.limt=3"])


def test_wrong_type_named():
    with pytest.raises(ConfigError, match="config key 'n'"):
        load_config(Cfg, sets=["n=abc"])
    with pytest.raises(ConfigError, match="config key 'inner.limit'"):
        load_config(Cfg, sets=["inner.limit=1.5"])
    assert load_config(Cfg, sets=["opt=null"]).opt is None

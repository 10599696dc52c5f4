import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpolens import load_model
from dpolens.artifacts import DpolensError, save_model_dir


def test_paper_pt_checkpoint_loads_on_its_base(tiny_dirs, tmp_path):
    base = load_model(tiny_dirs["gpt2"])
    state = {k: v.clone() for k, v in base.model.state_dict().items()}
    state["transformer.h.0.mlp.c_proj.bias"] += 1.0
    torch.save({"state": state}, tmp_path / "dpo.pt")
    lm = load_model(tmp_path / "dpo.pt", base=str(tiny_dirs["gpt2"]))
    assert lm.source == "paper-pt"
    assert torch.equal(lm.model.transformer.h[0].mlp.c_proj.bias, state["transformer.h.0.mlp.c_proj.bias"])
    assert lm.weight_hash != base.weight_hash
    with pytest.raises(DpolensError, match="give its base model"):
        load_model(tmp_path / "dpo.pt")


class Evil:
    """Any class not on torch's weights-only allow-list."""


def test_pt_with_pickled_object_is_refused(tiny_dirs, tmp_path):
    torch.save({"state": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(DpolensError, match="evil.pt was refused: it is not a plain tensor state dict"):
        load_model(tmp_path / "evil.pt", base=str(tiny_dirs["gpt2"]))


def test_weight_hash_is_stable(tiny_dirs):
    assert load_model(tiny_dirs["llama"]).weight_hash == load_model(tiny_dirs["llama"]).weight_hash


def test_missing_asset_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLENS_CACHE", str(tmp_path))
    with pytest.raises(DpolensError, match="dpolens assets fetch gemma-3-270m"):
        load_model("gemma-3-270m")


def test_import_touches_no_network():
    code = ("import socket\n"
            "def deny(*a, **k): raise RuntimeError('network used')\n"
            "socket.socket.connect = deny\nsocket.create_connection = deny\n"
            "import dpolens, dpolens.cli, dpolens.evaluate, dpolens.scoring\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_model_folder_is_written_whole_or_not_at_all(tiny_dirs, tmp_path):
    lm = load_model(tiny_dirs["llama"])
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "stale.txt").write_text("from an earlier run")
    save_model_dir(tmp_path / "model", lm.model, lm.tokenizer)
    assert load_model(tmp_path / "model").weight_hash == lm.weight_hash
    assert not (tmp_path / "model" / "stale.txt").exists()

    class Broken:
        def save_pretrained(self, path):
            (Path(path) / "half.safetensors").write_bytes(b"x")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_model_dir(tmp_path / "other", Broken(), lm.tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_frozen_copy_keeps_the_weights_of_now_while_the_original_trains(tiny_dirs):
    from dpolens.model.loading import frozen_copy

    lm = load_model(tiny_dirs["gpt2"])  # tied embeddings
    ref = frozen_copy(lm)
    assert ref.weight_hash == lm.weight_hash and ref.adapter.model is ref.model
    assert ref.adapter.tied_embeddings and not ref.model.training
    assert not any(p.requires_grad for p in ref.model.parameters())
    with torch.no_grad():
        for p in lm.model.parameters():
            p.add_(0.01)
    assert all(not torch.equal(a, b) for a, b in zip(ref.model.parameters(), lm.model.parameters()))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(ref.model(ids).logits, frozen_copy(ref).model(ids).logits)
        assert not torch.equal(ref.model(ids).logits, lm.model(ids).logits)

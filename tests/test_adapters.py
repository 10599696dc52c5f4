"""Adapters against slow reference computations on tiny random models of every family."""

import pytest
import torch

from dpolens.artifacts import DpolensError
from dpolens.model import hooks
from dpolens.model.adapters import Adapter, UnsupportedModelError

from conftest import make_model


def run_capture(lm, points, text="Holy cow, this is a great book"):
    ids = lm.tokenizer(text, return_tensors="pt")
    with torch.inference_mode(), hooks.capture(lm.adapter, points) as store:
        logits = lm.model(**ids).logits
    return {k: v[0] for k, v in store.items()}, logits, ids


def test_describe_matches_config(tiny_lm):
    d = tiny_lm.adapter.describe()
    assert d["n_layers"] == 3 and d["d_model"] == 32
    assert d["d_mlp"] == (128 if d["family"] == "gpt2" else 64)
    assert d["mlp_kind"] == ("gelu" if d["family"] in ("gpt2", "gpt_neox") else "gated")
    assert d["post_mlp_norm"] == (d["family"] == "gemma")


def test_residual_points_chain(tiny_lm):
    """resid_mid + mlp_out == resid_post, and resid_post(l) == resid_pre(l+1)."""
    a = tiny_lm.adapter
    pts = [(l, p) for l in range(a.n_layers) for p in ("resid_pre", "resid_mid", "resid_post", "mlp_out")]
    acts, _, _ = run_capture(tiny_lm, pts)
    for l in range(a.n_layers):
        torch.testing.assert_close(acts[(l, "resid_mid")] + acts[(l, "mlp_out")], acts[(l, "resid_post")])
        if l + 1 < a.n_layers:
            torch.testing.assert_close(acts[(l, "resid_post")], acts[(l + 1, "resid_pre")])


def test_value_vectors_rebuild_mlp_output(tiny_lm):
    """sum_i m_i v_i / s_t (+ bias) reproduces the MLP's contribution to the residual.

    s_t is 1 without a post-MLP norm and the RMS of the raw MLP output with Gemma's post-norm.
    """
    a = tiny_lm.adapter
    layer = 1
    acts, _, _ = run_capture(tiny_lm, [(layer, "mlp_act"), (layer, "mlp_out")])
    m, out = acts[(layer, "mlp_act")], acts[(layer, "mlp_out")]
    v = a.value_vectors(layer)
    proj = a.mlp_out_proj(layer)
    if a.post_mlp_norm:
        raw = m @ proj.weight.detach().T
        norm = a.post_mlp_norm_module(layer)
        s = torch.sqrt(raw.pow(2).mean(-1, keepdim=True) + norm.eps)
        rebuilt = (m @ v) / s
    else:
        rebuilt = m @ v + (proj.bias if proj.bias is not None else 0)
    torch.testing.assert_close(rebuilt, out, atol=1e-5, rtol=1e-4)


def test_key_vectors_drive_activation(tiny_lm):
    """For GELU MLPs m_i = gelu(k_i . x + b_i); for gated ones up_i . x enters m_i linearly."""
    a = tiny_lm.adapter
    layer = 0
    mlp = a.mlp(layer)
    acts, _, _ = run_capture(tiny_lm, [(layer, "resid_mid" if not a.parallel_residual else "resid_pre"),
                                       (layer, "mlp_act")])
    x = acts[(layer, "resid_mid")]
    norm = {"gpt2": lambda b: b.ln_2, "gpt_neox": lambda b: b.post_attention_layernorm,
            "llama": lambda b: b.post_attention_layernorm,
            "gemma": lambda b: b.pre_feedforward_layernorm}[a.family](a.layers[layer])
    with torch.no_grad():
        h = norm(x)
        gate = mlp.gate_proj(h) if a.mlp_kind == "gated" else None
    k = a.key_vectors(layer)
    ks = a.key_slice(layer)
    pre = h @ k.T + (ks.bias.detach() if ks.bias is not None else 0)
    if a.mlp_kind == "gelu":
        expected = mlp.act(pre) if hasattr(mlp, "act") else mlp.act_fn(pre)
    else:
        expected = mlp.act_fn(gate) * pre
    torch.testing.assert_close(expected, acts[(layer, "mlp_act")], atol=1e-5, rtol=1e-4)


def test_logit_lens_at_last_layer_equals_logits(tiny_lm):
    a = tiny_lm.adapter
    acts, logits, _ = run_capture(tiny_lm, [(a.n_layers - 1, "resid_post")])
    with torch.inference_mode():
        lens = a.logits(acts[(a.n_layers - 1, "resid_post")])
    torch.testing.assert_close(lens, logits, atol=1e-5, rtol=1e-4)


def test_wide_unembed_matches_linear_and_keeps_tying(tiny_lm, tmp_path):
    """The adapter's W·xᵀ head gives nn.Linear's logits, shares its parameter, and saves the same keys."""
    from dpolens import load_model

    head = tiny_lm.model.get_output_embeddings()
    assert type(head).__name__ == "WideUnembed"
    plain = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
    plain.weight, plain.bias = head.weight, head.bias
    x = torch.randn(3, 5, head.in_features)
    with torch.inference_mode():
        torch.testing.assert_close(head(x), plain(x), atol=1e-6, rtol=1e-5)
    assert tiny_lm.adapter.tied_embeddings == (head.weight is tiny_lm.model.get_input_embeddings().weight)
    assert tiny_lm.adapter.tied_embeddings == bool(tiny_lm.adapter.config.tie_word_embeddings)
    tiny_lm.model.save_pretrained(tmp_path)
    tiny_lm.tokenizer.save_pretrained(tmp_path)
    again = load_model(tmp_path)
    assert again.weight_hash == tiny_lm.weight_hash


def test_parallel_neox_has_no_resid_mid(tokenizer):
    a = Adapter(make_model("gpt_neox", len(tokenizer), use_parallel_residual=True))
    assert a.parallel_residual
    with pytest.raises(DpolensError, match="parallel residual"):
        a.point(0, "resid_mid")


def test_unsupported_architecture_lists_families(tokenizer):
    import transformers as tf

    model = tf.BertForMaskedLM(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, vocab_size=100))
    with pytest.raises(UnsupportedModelError, match="supported families: GPT-2"):
        Adapter(model)


def test_width_mismatch_names_both_widths(tiny_lm):
    with pytest.raises(DpolensError, match="width 7 but the model's d_model is 32"):
        tiny_lm.adapter.check_width(torch.zeros(7), "the probe")


def test_an_adapter_changes_nothing_on_the_model(tokenizer):
    """Only load_model prepares a model (model.loading.prepare); building an adapter reads it."""
    model = make_model("llama", len(tokenizer))
    head, training = model.get_output_embeddings(), model.training
    Adapter(model)
    assert model.get_output_embeddings() is head and type(head) is torch.nn.Linear and model.training == training


def test_device_auto_resolves_and_bad_names_are_refused():
    from dpolens.model.loading import resolve_device

    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto") == expected and resolve_device("cpu") == "cpu"
    with pytest.raises(DpolensError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


def test_wide_unembed_blocks_are_bit_identical_and_contiguous():
    """From BLOCK_MIN_ROWS positions on (no autograd, CPU), the head's 2,048-row vocabulary blocks
    give the one-block W·xᵀ logits bit for bit (at this block size; tiny blocks take MKL's small-matrix
    path and differ in the last bits), as contiguous rows; with autograd the one-block path runs."""
    from dpolens.model.adapters import WideUnembed

    torch.manual_seed(0)
    head = WideUnembed.sharing(torch.nn.Linear(64, 5000, bias=False))  # two full blocks and a ragged one
    x = torch.randn(2, head.BLOCK_MIN_ROWS, 64)
    one_block = (head.weight @ x.reshape(-1, 64).T).T.reshape(*x.shape[:-1], -1).detach()
    with torch.inference_mode():
        blocked = head(x)
        few = head(x[:1, : head.BLOCK_MIN_ROWS - 1])
    assert blocked.is_contiguous() and torch.equal(blocked, one_block)
    assert not few.is_contiguous() and torch.equal(few, one_block[:1, : head.BLOCK_MIN_ROWS - 1])
    y = x.clone().requires_grad_()
    trained = head(y)
    trained.sum().backward()
    assert not trained.is_contiguous() and y.grad is not None and torch.equal(trained.detach(), one_block)

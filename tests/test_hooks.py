"""Every hook context leaves the model bit-identical, also when the block raises."""

import pytest
import torch

from dpolens.model import hooks, interventions


def logits_of(lm, text="So I am starting to think she is full of"):
    ids = lm.tokenizer(text, return_tensors="pt")
    with torch.inference_mode():
        return lm.model(**ids).logits


CONTEXTS = {
    "capture": lambda a: hooks.capture(a, [(0, "resid_pre"), (1, "mlp_act"), (2, "resid_post")]),
    "add_vector": lambda a: hooks.add_vector(a, a.n_layers - 1, "resid_post", torch.ones(a.d_model)),
    "add_mid_positions": lambda a: hooks.add_vector(a, 1, "resid_mid" if not a.parallel_residual else "resid_pre",
                                                    torch.ones(a.d_model), positions=[0, 2]),
    "scale_neurons": lambda a: hooks.edit_neurons(a, 1, [0, 3, 5], scale=10.0),
    "set_neurons": lambda a: hooks.edit_neurons(a, 2, [1, 2], value=torch.tensor([3.0, -1.0])),
    "set_neurons_positions": lambda a: hooks.edit_neurons(a, 0, [4], value=2.0, positions=[1]),
    "shift_neurons": lambda a: hooks.edit_neurons(a, 1, [2, 6], shift=torch.tensor([0.5, -2.0])),
    "scale_keys": lambda a: hooks.scale_keys(a, 1, [0, 7], 10.0),
    "scale_positive": lambda a: hooks.edit_neurons(a, 1, [0, 3, 5], scale=10.0, positive_only=True),
}


@pytest.mark.parametrize("kind", list(CONTEXTS))
def test_context_changes_then_restores_exactly(tiny_lm, kind):
    before = logits_of(tiny_lm)
    with CONTEXTS[kind](tiny_lm.adapter):
        during = logits_of(tiny_lm)
    after = logits_of(tiny_lm)
    assert torch.equal(before, after)
    if kind != "capture":
        assert not torch.equal(before, during), f"{kind} had no effect"


@pytest.mark.parametrize("kind", list(CONTEXTS))
def test_context_restores_after_exception(tiny_lm, kind):
    before = logits_of(tiny_lm)
    with pytest.raises(RuntimeError, match="boom"):
        with CONTEXTS[kind](tiny_lm.adapter):
            logits_of(tiny_lm)
            raise RuntimeError("boom")
    assert torch.equal(before, logits_of(tiny_lm))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny_lm.model.modules())


def test_stop_at_ends_forward_and_keeps_capture(tiny_lm):
    a = tiny_lm.adapter
    before = logits_of(tiny_lm)
    ids = tiny_lm.tokenizer("hello world", return_tensors="pt")
    with hooks.capture(a, [(1, "resid_post")]) as store, hooks.stop_at(a, 1, "resid_post"):
        with pytest.raises(hooks.StopForward):
            tiny_lm.model(**ids)
    assert store[(1, "resid_post")][0].shape[-1] == a.d_model
    assert torch.equal(before, logits_of(tiny_lm))


def test_subtracting_residual_equals_manual_reference(tiny_lm):
    """add_vector at the last resid_post == logit lens of (captured resid - alpha u)."""
    a = tiny_lm.adapter
    last = a.n_layers - 1
    u = torch.randn(a.d_model, generator=torch.Generator().manual_seed(0))
    ids = tiny_lm.tokenizer("You are such a piece of", return_tensors="pt")
    with torch.inference_mode():
        with hooks.capture(a, [(last, "resid_post")]) as store:
            tiny_lm.model(**ids)
        expected = a.logits(store[(last, "resid_post")][0] - 2.5 * u)
        with hooks.add_vector(a, last, "resid_post", -2.5 * u):
            got = tiny_lm.model(**ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_zeroing_all_neurons_leaves_only_bias(tiny_lm):
    a = tiny_lm.adapter
    ids = tiny_lm.tokenizer("hello world", return_tensors="pt")
    with torch.inference_mode(), hooks.edit_neurons(a, 1, list(range(a.d_mlp)), value=0.0), \
            hooks.capture(a, [(1, "mlp_out")]) as store:
        tiny_lm.model(**ids)
    out = store[(1, "mlp_out")][0]
    bias = a.mlp_out_proj(1).bias
    expected = torch.zeros_like(out) + (bias if bias is not None else 0)
    if a.post_mlp_norm:
        expected = torch.zeros_like(out)
    torch.testing.assert_close(out, expected)


def test_shifting_neurons_adds_to_exactly_those_activations(tiny_lm):
    a = tiny_lm.adapter
    ids = tiny_lm.tokenizer("You are such a piece of", return_tensors="pt")
    shift = torch.tensor([0.5, -2.0])
    with torch.inference_mode():
        with hooks.capture(a, [(1, "mlp_act")]) as plain:
            tiny_lm.model(**ids)
        with hooks.edit_neurons(a, 1, [2, 6], shift=shift), hooks.capture(a, [(1, "mlp_act")]) as shifted:
            tiny_lm.model(**ids)
    expected = plain[(1, "mlp_act")][0].clone()
    expected[..., [2, 6]] += shift
    torch.testing.assert_close(shifted[(1, "mlp_act")][0], expected)


def test_scale_positive_scales_only_positive_activations(tiny_lm):
    """The `scale_positive` spec == the plain activations with exactly the chosen neurons' positive
    entries scaled (checked at the layer, and downstream by feeding that reference tensor in);
    the logits come back bit-identical and no hook is left behind."""
    a = tiny_lm.adapter
    module, _ = a.point(1, "mlp_act")
    ids = tiny_lm.tokenizer("You are such a piece of", return_tensors="pt")
    chosen = [0, 3, 5, 9]
    before = logits_of(tiny_lm)
    with torch.inference_mode():
        with hooks.capture(a, [(1, "mlp_act")]) as plain:
            tiny_lm.model(**ids)
        m = plain[(1, "mlp_act")][0]  # [1, T, d_mlp]
        expected = m.clone()
        expected[..., chosen] = torch.where(m[..., chosen] > 0, 10.0 * m[..., chosen], m[..., chosen])
        assert (m[..., chosen] > 0).any() and (m[..., chosen] < 0).any()
        spec = [{"kind": "scale_positive", "layer": 1, "neurons": chosen, "factor": 10.0}]
        with interventions.apply(tiny_lm, spec), hooks.capture(a, [(1, "mlp_act")]) as edited:
            got = tiny_lm.model(**ids).logits
        with hooks.on_tensor(module, "input", lambda _m: expected):
            reference = tiny_lm.model(**ids).logits
    assert torch.equal(edited[(1, "mlp_act")][0], expected)
    torch.testing.assert_close(got, reference)
    assert torch.equal(before, logits_of(tiny_lm))
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in tiny_lm.model.modules())
    with pytest.raises(ValueError, match="positive_only"):
        hooks.edit_neurons(a, 1, chosen, shift=1.0, positive_only=True).__enter__()


def test_intervention_spec_applies_and_restores(tiny_lm, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "interventions:\n"
        "  - {kind: subtract, vector: {random: 3}, alpha: 4.0}\n"
        "  - {kind: neurons, layer: 1, neurons: [1, 2], scale: 0.0}\n"
        "  - {kind: neurons, layer: 0, neurons: [3], shift: [1.5]}\n"
        "  - {kind: scale_keys, layer: 0, neurons: [5], factor: 10}\n"
        "  - {kind: scale_positive, layer: 2, neurons: [1, 4], factor: 10}\n"
    )
    before = logits_of(tiny_lm)
    with interventions.apply(tiny_lm, str(spec)) as edits:
        during = logits_of(tiny_lm)
    assert [e.kind for e in edits] == ["subtract", "neurons", "neurons", "scale_keys", "scale_positive"]
    assert not torch.equal(before, during)
    assert torch.equal(before, logits_of(tiny_lm))


def test_intervention_spec_rejects_unknown_key(tiny_lm):
    from dpolens.config import ConfigError

    with pytest.raises(ConfigError, match="unknown config key 'intervention.alpah'"):
        interventions.parse_spec([{"kind": "subtract", "alpah": 1.0}])

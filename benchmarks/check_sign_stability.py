"""Stability of a gated neuron's sign (issue #31): the mean rule sign(Σm) the probe stage uses against a rule led by
the strongest activations, sign(Σm³), each from 3 disjoint sets of 256 of the probe's toxic training texts.

    python benchmarks/check_sign_stability.py gemma-3-270m runs/<study>/probe/probe.safetensors
"""
import sys

import torch

import common  # noqa: F401  (puts src/ on the path)
from dpolens import load_model
from dpolens.stages.probe import ProbeConfig
from dpolens.data import load_labelled, balanced_sample
from dpolens.directions import load_probe, rank_by_probe
from dpolens.model import hooks
from dpolens.model.generation import left_pad
model, probe_path = sys.argv[1], sys.argv[2]
cfg = ProbeConfig(model=model, max_examples=4000, max_tokens=48)
ex = []
for spec in cfg.data: ex += load_labelled(spec, cfg.skip_bad_rows)
ex = balanced_sample(ex, cfg.max_examples, cfg.balance, cfg.seed)
toxic = [t for t, l in ex if l == 1][:768]
lm = load_model(model); a = lm.adapter; L = a.n_layers
def sums(texts):
    s1 = torch.zeros(L, a.d_mlp, dtype=torch.float64); s3 = s1.clone()
    ids = [x[:48] for x in lm.tokenizer(texts, add_special_tokens=True)["input_ids"]]
    for i in range(0, len(ids), 32):
        x, mask = left_pad(ids[i:i+32], lm.tokenizer.pad_token_id, lm.device)
        first = mask.float().cumsum(1) == 1  # drop each text's first (BOS) token, as neuron_signs does
        keep = (mask.bool() & ~first).double()
        with torch.inference_mode(), hooks.capture(a, [(l, "mlp_act") for l in range(L)]) as st:
            lm.model(input_ids=x, attention_mask=mask)
        for l in range(L):
            m = st[(l, "mlp_act")][0].double()
            s1[l] += torch.einsum("bt,btd->d", keep, m); s3[l] += torch.einsum("bt,btd->d", keep, m ** 3)
    return s1, s3
A, B, C = sums(toxic[:256]), sums(toxic[256:512]), sums(toxic[512:768])
probe, meta = load_probe(probe_path, lm)
cos = rank_by_probe(lm, probe, "standardized", meta.get("feature_std")).abs().flatten()
top = cos.topk(128).indices
for name, k in (("mean  sign(Σm)", 0), ("cubic sign(Σm³)", 1)):
    sa, sb, sc = (torch.sign(x[k]).flatten() for x in (A, B, C))
    print(f"{name}: agreement of 3 disjoint sets of 256 toxic texts, pairs AB/AC/BC: all neurons "
          f"{(sa == sb).double().mean():.4f}/{(sa == sc).double().mean():.4f}/{(sb == sc).double().mean():.4f}; "
          f"top-128 |cos|: {(sa[top] == sb[top]).double().mean():.4f}/{(sa[top] == sc[top]).double().mean():.4f}/"
          f"{(sb[top] == sc[top]).double().mean():.4f}; negative share {(sa < 0).double().mean():.4f}")
stored = meta.get("neuron_sign")
print("rules agree (set A):", (torch.sign(A[0]) == torch.sign(A[1])).double().mean().item(),
      "top-128:", (torch.sign(A[0]).flatten()[top] == torch.sign(A[1]).flatten()[top]).double().mean().item())

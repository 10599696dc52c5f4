"""Generation of 64 challenge prompts x 20 tokens on gemma-3-270m: no hooks, an empty hook
context, and a residual subtraction. Goal: hooks cost <= 5% (ratio >= 0.95)."""

import torch
from common import SHARED, report, timed

from dpolens import load_model
from dpolens.data import load_prompts
from dpolens.model import hooks
from dpolens.model.generation import generate

lm = load_model("gemma-3-270m")
a = lm.adapter
prompts = load_prompts(SHARED / "rtp/challenge_prompts.jsonl", 64)
run = lambda: generate(lm, prompts, 20, batch_size=64, progress=False)
run()  # warm-up
base, ref = timed(run, 2)
with hooks.capture(a, [], fn=lambda *x: None):
    empty, out_empty = timed(run, 2)
u = torch.randn(a.d_model)
with hooks.add_vector(a, a.n_layers - 1, "resid_post", -50 * u / u.norm()):
    sub, _ = timed(run, 2)
noop_hooks = [hooks.on_tensor(a.layers[l], "output", lambda x: None) for l in range(a.n_layers)]
with hooks.contextlib.ExitStack() as st:
    for h in noop_hooks:
        st.enter_context(h)
    every_layer, out_every = timed(run, 2)
assert [g.continuation_ids for g in out_empty] == [g.continuation_ids for g in ref]
assert [g.continuation_ids for g in out_every] == [g.continuation_ids for g in ref]
report("generation, 64 prompts x 20 tokens (ratio = baseline time / variant time)", base,
       [("empty hook context", empty), ("no-op hook on all 18 layers", every_layer),
        ("residual subtraction (last layer)", sub)], 64 * 20, "token")

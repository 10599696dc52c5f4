"""One DPO training step through TRL, against a plain forward+backward of the same batch outside TRL
(gemma-3-270m, fp32, CPU, embeddings frozen as in the study configs). Goal (issue #16, item 5): the
DPO step at most 1.3x the plain step. Also the step's share of this machine's fp32 roofline, taken as
the rate of a 2048x2048 fp32 matmul (2*2048^3 FLOP) measured in the same process.

The batch is the one TRL's collator builds: 4 pairs = 8 sequences (chosen and rejected, padded to the
longest). Variants, all fwd+bwd on that batch with the same trainable parameters:
- plain, full logits: `model(input_ids, attention_mask, labels=...)`, transformers' own loss;
- plain, completion logits: the body, then the unembedding at the completion positions only;
- TRL `training_step` with TRL 1.16's fused head: DPO loss with precomputed reference log-probs,
  TRL's bookkeeping and metrics; off Triton devices the head projects every position;
- the same step under `dpolens.model.heads.completion_head` (what `dpolens dpo` runs): the
  unembedding at completion positions only.
FLOP counted for the roofline share: 6*P_body per real token (forward 2, backward 4) + 4*V*d per
completion token (the frozen unembedding needs its input's gradient only); padding and full-logit
positions are not counted, so the share is that of the useful work.
"""

import json
import tempfile

import torch
from common import SHARED, fp32_roofline, timed

from dpolens import load_model
from dpolens.data import load_prompts
from dpolens.training import _dataset, _trainer_class
from dpolens.model.heads import completion_head

mm_s, roofline = fp32_roofline()

lm = load_model("gemma-3-270m")
model = lm.model
model.get_input_embeddings().weight.requires_grad_(False)
model.get_output_embeddings().weight.requires_grad_(False)
prompts = load_prompts(SHARED / "rtp/challenge_prompts.jsonl", 4)
pairs = [{"prompt_text": p, "unpert_gen_text": " and then we went back to the house to talk about what had happened "
          "that night, and nobody said a word about it.",
          "pert_gen_text": " and those stupid idiots kept yelling at us like the worthless pieces of garbage they "
          "are, so we told them to shut up."} for p in prompts]

from trl import DPOConfig  # noqa: E402  (after the model: TRL's import is slow)

args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, learning_rate=1e-6, optim="rmsprop",
                 precompute_ref_log_probs=True, report_to=[], use_cpu=True, max_length=128, disable_tqdm=True,
                 logging_steps=1, seed=0)
trainer = _trainer_class()(model=model, args=args, train_dataset=_dataset(lm, pairs), processing_class=lm.tokenizer,
                           adapter=lm.adapter)
batch = next(iter(trainer.get_train_dataloader()))
ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
labels = ids.masked_fill(comp == 0, -100)
model.train()
trainer.current_gradient_accumulation_steps = 1  # set by train(); the step is timed outside it


def plain_full():
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, attention_mask=attn, labels=labels, use_cache=False).loss.backward()


def plain_completion():
    model.zero_grad(set_to_none=True)
    hidden = lm.adapter.body(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
    keep = labels[:, 1:] != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    torch.nn.functional.cross_entropy(logits, labels[:, 1:][keep]).backward()


def trl_step():
    model.zero_grad(set_to_none=True)
    trainer.training_step(model, batch)


def dpolens_step():
    with completion_head(model, lm.adapter, trainer.head_outputs):
        trl_step()


for fn in (plain_full, plain_completion, trl_step, dpolens_step):
    fn()  # warm-up
full_s, _ = timed(plain_full, 3)
comp_s, _ = timed(plain_completion, 3)
trl_s, _ = timed(trl_step, 3)
ours_s, _ = timed(dpolens_step, 3)

n_params = sum(p.numel() for p in model.parameters())
unembed = lm.adapter.unembed_module.weight.numel()
body = n_params - unembed
tokens, completion = int(attn.sum()), int(comp[:, 1:].sum())
flop = 6 * body * tokens + 4 * unembed * completion
print(f"== fp32 matmul 2048x2048: {mm_s * 1e3:.1f} ms = {roofline / 1e9:.1f} GFLOP/s (the roofline used)")
print(f"== one training step (fwd+bwd), gemma-3-270m fp32, batch {ids.shape[0]} sequences x {ids.shape[1]} tokens "
      f"({tokens} real, {completion} completion tokens), {flop / 1e9:.0f} GFLOP counted")
print(f"{'variant':<34} {'seconds':>8} {'vs plain full':>14} {'vs plain completion':>20} {'roofline':>9}")
for label, s in (("plain, full logits", full_s), ("plain, completion logits", comp_s),
                 ("TRL DPO step, TRL's head", trl_s), ("TRL DPO step, completion head", ours_s)):
    print(f"{label:<34} {s:>8.2f} {s / full_s:>13.3f}x {s / comp_s:>19.3f}x {flop / s / roofline:>9.1%}")
print(json.dumps({"dpo_step_over_plain_completion": round(ours_s / comp_s, 3),
                  "dpo_step_over_plain_full": round(ours_s / full_s, 3), "goal": "<= 1.3"}))

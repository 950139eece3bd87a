"""Fine-tuning (`lmjax finetune`): the model, tokenizer and objective come from the --init run.

  lmjax finetune --config=configs/finetune.py:sft_lora --workdir=runs/sft --init=runs/quickstart \
    --config.finetune.data=sft.jsonl

Variants: sft, sft_lora, classification, classification_lora, dpo, dpo_lora. LoRA trains rank-16
adapters on every projection (a few percent of the params) with a higher learning rate than full
fine-tuning. DPO (preference pairs) takes fewer steps at a lower learning rate.
"""
from lmjax.config import default_config


def get_config(variant: str = "sft"):
  task, _, lora = variant.partition("_")
  if task not in ("sft", "classification", "dpo") or lora not in ("", "lora"):
    raise ValueError(f"Unknown variant '{variant}': use sft, sft_lora, classification, "
                     "classification_lora, dpo or dpo_lora.")
  c = default_config()
  c.finetune.task = task
  c.finetune.val_fraction = 0.1
  c.data.seq_len = 128
  c.train.batch_size = 16
  c.train.steps = 300
  c.train.log_every = 25
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.optim.warmup_steps = 20
  c.optim.learning_rate = 3e-4
  c.optim.weight_decay = 0.0
  if task == "dpo":
    c.train.steps = 100
    c.train.eval_every = 50
    c.optim.learning_rate = 1e-4
    c.finetune.dpo_beta = 0.1
  if lora:
    c.finetune.lora_rank = 16
    c.finetune.lora_alpha = 32.0
    c.finetune.lora_targets = "query,key,value,out,up,down"
    c.optim.learning_rate = 2e-3 if task != "dpo" else 5e-4
  return c

"""The config schema: every section and key with its default, and the allowed values of each
enumerated key (`CHOICES`, written once: validation, `lmjax config --keys` and the README's table
read it). config.py loads, overrides and validates configs against it.
"""
from __future__ import annotations

import ml_collections

ConfigDict = ml_collections.ConfigDict

DTYPE_NAMES = ("float32", "bfloat16", "float16")

# Allowed values of every enumerated key (the first is not necessarily the default).
CHOICES = {
    "model.style": ("gpt2", "llama"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    "model.attention": ("auto", "xla", "splash", "cudnn"),
    "model.parametrization": ("sp", "mup"),
    "model.quantize": ("none", "int8", "int4"),
    "model.dtype": DTYPE_NAMES,
    "model.param_dtype": DTYPE_NAMES,
    "data.tokenizer_type": ("bpe", "unigram", "byte_bpe"),
    "data.packing": ("none", "documents"),
    "train.objective": ("causal_lm", "masked_lm"),
    "optim.name": ("adamw", "lion", "adafactor"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "finetune.task": ("sft", "classification", "dpo"),
    "finetune.dpo_loss": ("sigmoid", "ipo"),
    "distill.kl": ("forward", "reverse"),
    "finetune.pooling": ("last", "mean", "first"),
    "distributed.initialize": ("auto", "yes", "no"),
}
FINETUNE_TASKS = CHOICES["finetune.task"]

# The allowed range of every numeric key (config.check_ranges; a test walks the schema and tries
# a value outside each): ">=1", ">0", "[0,1)" (an interval), "-1|>=1" (a sentinel or a range),
# "any".
RANGES = {
    "model.num_layers": ">=1", "model.d_model": ">=1", "model.num_heads": ">=1",
    "model.num_kv_heads": ">=0", "model.head_dim": ">=0", "model.mlp_dim": ">=1",
    "model.vocab_size": ">=2", "model.max_len": ">=1", "model.rope_theta": ">0",
    "model.norm_eps": ">0", "model.init_std": ">0", "model.dropout": "[0,1)",
    "model.mup_base_width": ">=0", "model.quant_group": ">=2", "model.loss_chunk": ">=0",
    "data.seq_len": ">=1", "data.vocab_size": ">=0", "data.tokenizer_sample_bytes": ">=1",
    "data.max_bytes": ">=0", "data.val_fraction": "[0,1)", "data.shard_tokens": ">=1",
    "data.num_workers": ">=0", "data.prefetch": ">=0",
    "train.steps": ">=1", "train.batch_size": ">=1", "train.seed": "any", "train.log_every": ">=1",
    "train.eval_every": ">=1", "train.eval_batches": ">=1", "train.checkpoint_every": ">=1",
    "train.keep_checkpoints": ">=1", "train.spike_factor": "0|>1", "train.spike_window": ">=1",
    "train.mask_prob": "(0,1]",
    "train.mask_token_fraction": "[0,1]", "train.random_token_fraction": "[0,1]",
    "train.mask_token_id": ">=-1",
    "optim.learning_rate": ">0", "optim.warmup_steps": ">=0", "optim.min_lr_ratio": "[0,1]",
    "optim.weight_decay": ">=0", "optim.b1": "[0,1)", "optim.b2": "[0,1)", "optim.eps": ">0",
    "optim.grad_clip": ">=0", "optim.accumulation_steps": ">=1",
    "finetune.val_fraction": "[0,1)", "finetune.lora_rank": ">=0", "finetune.lora_alpha": ">0",
    "finetune.num_classes": ">=0", "finetune.dpo_beta": ">0",
    "distill.alpha": "[0,1]", "distill.temperature": ">0",
    "distributed.num_processes": ">=0", "distributed.process_id": ">=-1",
    "mesh.data": "-1|>=1", "mesh.fsdp": "-1|>=1", "mesh.tensor": "-1|>=1", "mesh.dcn_data": ">=1",
    "mesh.dcn_fsdp": ">=1", "mesh.dcn_tensor": ">=1",
}
LORA_TARGETS = ("query", "key", "value", "out", "up", "gate", "down")  # gate: llama style only

# model.* keys that say how the model runs, not what it is: they may change when a run resumes or
# is fine-tuned. Every other model key fixes the function the params compute.
RUNTIME_MODEL_KEYS = ("dropout", "dtype", "remat", "attention", "loss_chunk")
MASKED_LM_KEYS = ("mask_prob", "mask_token_fraction", "random_token_fraction", "mask_token_id")
# finetune.* keys that make one fine-tuning another
FINETUNE_IDENTITY_KEYS = ("init", "task", "lora_rank", "lora_alpha", "lora_targets", "pooling",
                          "dpo_beta", "dpo_loss")
DISTILL_IDENTITY_KEYS = ("teacher", "alpha", "temperature", "kl")


def _model() -> ConfigDict:
  s = ConfigDict()
  s.style = "gpt2"  # "gpt2": learned positions, LayerNorm, GELU, biases | "llama": RoPE, RMSNorm, SwiGLU
  s.num_layers = 12
  s.d_model = 768
  s.num_heads = 12
  s.num_kv_heads = 0  # 0 = num_heads (multi-head); fewer = grouped-query attention
  s.head_dim = 0  # 0 = d_model // num_heads
  s.mlp_dim = 3072
  s.vocab_size = 50304
  s.max_len = 1024
  s.tie_embeddings = True
  s.rope_theta = 10000.0
  s.norm_eps = 1e-5
  s.init_std = 0.02
  s.dropout = 0.0
  s.dtype = "float32"  # compute dtype
  s.param_dtype = "float32"
  s.scan_layers = False
  s.remat = "none"  # what each layer saves for the backward pass
  # auto: splash on TPU, cudnn on NVIDIA GPUs (16-bit compute), xla elsewhere (the CPU) |
  # xla: lmjax's einsum-softmax (ops.attention) | splash: Pallas splash attention (TPU) |
  # cudnn: cuDNN flash attention (NVIDIA GPUs)
  s.attention = "auto"
  # the LM head and cross-entropy run over this many positions of every row at a time, each
  # chunk's logits recomputed in the backward: [rows, loss_chunk, vocab] float32 logits live at
  # once instead of [rows, seq_len, vocab]; 0 = the whole sequence at once
  s.loss_chunk = 512
  s.causal = True  # False: bidirectional attention (an encoder; train.objective=masked_lm)
  # sp: standard parametrization | mup: maximal update parametrization (hyperparameters tuned at
  # d_model = mup_base_width transfer to other widths; see model.ModelConfig.width_mult)
  s.parametrization = "sp"
  s.mup_base_width = 0
  # weight-only quantized projections, written by `lmjax quantize` (such a run is not trained):
  # none | int8 (per output channel) | int4 (group-wise, quant_group inputs per scale, packed)
  s.quantize = "none"
  s.quant_group = 128
  return s


def _data() -> ConfigDict:
  s = ConfigDict()
  # synthetic | pystdlib | text:GLOB | parquet:GLOB | arrow:PATH | tfds:NAME; "mixture" (set from
  # data.mixture)
  s.source = "synthetic"
  # weighted sources, "NAME:WEIGHT:SOURCE,..." (e.g. "web:0.7:text:web/*.jsonl,code:0.3:pystdlib");
  # "" = data.source alone
  s.mixture = ""
  s.seq_len = 256
  # pretraining windows cut the token stream anywhere; "documents": attention stays inside each
  # eos-terminated document of a window, positions restart per document (causal_lm only)
  s.packing = "none"
  s.text_field = "text"  # field of .jsonl records, column of parquet/arrow rows, TFDS feature
  s.tfds_data_dir = ""
  s.tfds_split = "train"
  # a SentencePiece .model, a Hugging Face tokenizer.json, or a directory with either; "" = train
  # one into the prepared dir (WORKDIR/data/tokenizer.model, or tokenizer.json for byte_bpe)
  s.tokenizer = ""
  # of a trained tokenizer: bpe | unigram (SentencePiece) | byte_bpe (byte-level BPE, tokenizers)
  s.tokenizer_type = "bpe"
  s.vocab_size = 0  # tokenizer vocabulary when training one; 0 = model.vocab_size
  s.tokenizer_sample_bytes = 20_000_000
  s.max_bytes = 0  # cap on corpus bytes read by `prepare` (0 = all)
  s.prepared_dir = ""  # "" = WORKDIR/data
  s.val_fraction = 0.005
  s.shard_tokens = 50_000_000
  s.num_workers = 0  # 0 = all cores
  s.prefetch = 4
  return s


def _train() -> ConfigDict:
  s = ConfigDict()
  s.steps = 1000
  s.batch_size = 32  # global, across all devices and hosts
  s.seed = 0
  s.log_every = 10
  s.eval_every = 200
  s.eval_batches = 8
  s.checkpoint_every = 500
  s.keep_checkpoints = 3
  # stop when the loss exceeds spike_factor x the mean of the last spike_window losses (and is at
  # least 1 nat above it); 0 = off (non-finite values and a zero gradient norm always stop)
  s.spike_factor = 4.0
  s.spike_window = 50
  s.sample_prompt = ""  # printed with a sample continuation at the end of training
  s.wandb_project = ""  # log config and metrics to this Weights & Biases project ("" = off)
  s.wandb_entity = ""  # the W&B team or user ("" = your default)
  s.profile_steps = ""  # "START:END": a JAX profiler trace of those steps in WORKDIR/plugins
  s.objective = "causal_lm"  # causal_lm (next token) | masked_lm (BERT; model.causal=False)
  s.mask_prob = 0.15  # masked_lm: fraction of (non-pad) tokens selected for prediction
  s.mask_token_fraction = 0.8  # of the selected: replaced by the mask token
  s.random_token_fraction = 0.1  # of the selected: replaced by a random token (rest: kept)
  s.mask_token_id = -1  # -1: the tokenizer's "[MASK]" piece (synthetic data: vocab_size - 1)
  return s


def _optim() -> ConfigDict:
  s = ConfigDict()
  s.name = "adamw"
  s.learning_rate = 6e-4
  s.warmup_steps = 100
  s.schedule = "cosine"
  s.min_lr_ratio = 0.1
  s.weight_decay = 0.1
  s.b1 = 0.9
  s.b2 = 0.95
  s.eps = 1e-8
  s.grad_clip = 1.0  # global-norm clipping; 0 = off
  s.decay_norms_and_biases = False
  s.accumulation_steps = 1
  return s


def _finetune() -> ConfigDict:
  s = ConfigDict()
  s.init = ""  # run (or converted HF) workdir whose latest params start fine-tuning
  s.task = "sft"
  # .jsonl, .parquet or an Arrow dataset (save_to_disk dir, .arrow); a record a line or row:
  # sft: {"prompt","response"} or {"messages"}; classification: {"text","label"}
  s.data = ""
  s.val_fraction = 0.1  # held-out examples (at least one), fixed by train.seed
  s.lora_rank = 0  # 0 = full fine-tuning
  s.lora_alpha = 16.0  # LoRA scale is lora_alpha / lora_rank
  s.lora_targets = "query,value"  # of query,key,value,out,up,gate,down
  s.num_classes = 0  # classification; 0 = from the data's labels
  s.pooling = "last"  # classification: last (the eos; decoders) | mean | first
  s.dpo_beta = 0.1  # dpo: the strength of the pull toward the reference (the init model)
  s.dpo_loss = "sigmoid"  # dpo: sigmoid (DPO) | ipo (IPO)
  return s


def _distill() -> ConfigDict:
  s = ConfigDict()
  s.teacher = ""  # a run (or converted HF) workdir: `lmjax distill` trains toward its outputs
  s.alpha = 0.5  # loss = alpha * cross-entropy + (1 - alpha) * temperature^2 * KL
  s.temperature = 1.0  # softens both distributions in the KL
  s.kl = "forward"  # forward: KL(teacher || student) | reverse: KL(student || teacher)
  return s


def _distributed() -> ConfigDict:
  s = ConfigDict()
  # "auto": jax.distributed.initialize() when the environment names a cluster (Cloud TPU VM slices
  # with more than one host, SLURM, or the JAX_COORDINATOR_ADDRESS variable); "yes": always, with
  # the values below where set; "no": single process.
  s.initialize = "auto"
  s.coordinator_address = ""  # host:port of process 0
  s.num_processes = 0  # 0 = from the environment
  s.process_id = -1  # -1 = from the environment
  s.local_device_ids = ""  # e.g. "0,1,2,3" for one process per GPU group
  return s


def _mesh() -> ConfigDict:
  s = ConfigDict()
  s.data = -1  # -1 = the remaining devices
  s.fsdp = 1
  s.tensor = 1
  # how much of each axis runs across slices (multi-slice TPU; on GPU/CPU, across processes):
  # the mesh is ICI (data/dcn_data, ...) within a slice x DCN (dcn_data, ...) between slices
  s.dcn_data = 1
  s.dcn_fsdp = 1
  s.dcn_tensor = 1
  # logical axis -> mesh axes: a mesh axis name, a tuple of them, or "" (replicated). Params use
  # embed/mlp/heads/kv_heads/kv/vocab/norm/layers; activations batch/length/act_*.
  s.rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("kv", ""),
      ("vocab", "tensor"),
      ("norm", ""),
      ("layers", ""),
      ("length", ""),
      ("act_embed", ""),
      ("act_heads", "tensor"),
      ("act_mlp", "tensor"),
      ("act_vocab", "tensor"),
  )
  return s


SECTIONS = {"model": _model, "data": _data, "train": _train, "optim": _optim,
            "finetune": _finetune, "distill": _distill, "distributed": _distributed, "mesh": _mesh}


def default_config() -> ConfigDict:
  """The schema: every key with its default. Config files start from it and change values."""
  c = ConfigDict()
  for name, section in SECTIONS.items():
    c[name] = section()
  return c

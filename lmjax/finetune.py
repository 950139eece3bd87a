"""Fine-tuning a trained or converted run: supervised fine-tuning (SFT) and sequence classification,
full or LoRA.

  lmjax finetune --config=FILE --workdir=OUT --init=RUN

The model (every key but config.RUNTIME_MODEL_KEYS), the tokenizer, the data section (for
`lmjax eval` of the result) and the pretraining objective come from the --init run's config.json;
its latest params start the run (builder.FromRun). The config file gives finetune.*, train.*
(steps, batch size, ...), optim.*, mesh.* and data.seq_len. The loop is `lmjax train`'s
(loop.run_loop): checkpoints, resume by rerunning the command, Ctrl-C / SIGTERM, metrics.jsonl and
TensorBoard. The data formats are in data/tasks.py, the losses in losses.py, LoRA in lora.py.

OUT holds (workdir.py)
  config.json, metrics.jsonl, events.*  as any run
  finetune/checkpoints/STEP             the fine-tuning state: base, adapters, head, optimizer
                                        state, data position
  checkpoints/STEP                      written when training finishes: the final params with the
                                        adapters merged (W + A B scale) as a plain lmjax run, for
                                        `lmjax eval`, `lmjax generate`, `lmjax convert --to_hf`
  classifier.npz                        classification: the head, label names and pooling
                                        (classifier.load_classifier)
"""
from __future__ import annotations

import functools
import os

import jax
import numpy as np
from etils import epath

from lmjax import builder
from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax import evaluate as evaluate_lib
from lmjax import lora as lora_lib
from lmjax import lock
from lmjax import loop
from lmjax import workdir as workdir_lib
from lmjax.data import tasks
from lmjax.data.tokenizer import load_tokenizer
from lmjax.errors import ConfigError, DataError
from lmjax.frozen import objective as make_objective
from lmjax.metrics import log
from lmjax.trees import to_host

# train.* keys that belong to the fine-tuning loop; the others (the objective) come from --init
LOOP_TRAIN_KEYS = ("steps", "batch_size", "seed", "log_every", "eval_every", "eval_batches",
                   "checkpoint_every", "keep_checkpoints", "sample_prompt", "wandb_project",
                   "wandb_entity", "profile_steps")


# --- the config: the user's sections around the --init run's model ------------------------------

def resolve_config(spec: str | None, workdir: str, init: str | None = None, overrides=()):
  """`lmjax finetune`'s config: --config (or, to resume, WORKDIR/config.json) and `a.b=v`
  overrides, around the --init run's model, tokenizer and data. Raises before anything is read
  but configs and the jsonl's existence."""
  if spec:
    cfg = config_lib.default_config()  # finalized once, with the init's model (its max_len...)
    file_cfg = config_lib.load_config_file(spec)
    config_lib.validate_against_schema(file_cfg, where=spec.partition(":")[0])
    cfg.update(file_cfg)
    cfg = config_lib.apply_overrides(cfg, overrides)
  elif workdir_lib.has_run(workdir):
    cfg = config_lib.apply_overrides(workdir_lib.read_config(workdir), overrides)
    cfg.distributed = config_lib.default_config().distributed
  else:
    raise ConfigError("lmjax finetune needs --config=FILE.py[:VARIANT] (or a --workdir that holds "
                      "a fine-tuning run's config.json, to resume it).")
  if init:
    cfg.finetune.init = init
  return with_init(cfg, workdir, overrides)


def _init_run(cfg, workdir: str):
  """(path, config) of the --init run, checked."""
  f = cfg.finetune
  if not f.init:
    raise ConfigError("lmjax finetune needs --init=RUN_DIR: the workdir of a `lmjax train` run or "
                      "of `lmjax convert --from_hf`, whose latest checkpoint fine-tuning starts "
                      "from.")
  init = workdir_lib.absolute(f.init)
  if init == workdir_lib.absolute(workdir):
    raise ConfigError(f"--workdir and --init are the same directory ({init}); fine-tune into a "
                      "new --workdir (the --init run is only read).")
  if not workdir_lib.has_run(init):
    raise ConfigError(f"--init={f.init}: no run there ({workdir_lib.config_path(init)} is "
                      "missing). Pass the workdir of a `lmjax train` run or of `lmjax convert "
                      "--from_hf`.")
  init_cfg = workdir_lib.load_config(init)
  if not workdir_lib.has_checkpoint(init):
    raise ConfigError(f"--init={f.init} has no checkpoint in {workdir_lib.checkpoint_dir(init)}: "
                      "train it first, or import one with `lmjax convert --from_hf`.")
  return init, init_cfg


def _model_of(cfg, init_cfg, overrides) -> dict:
  """The --init run's model section, with the runtime keys the config itself chose."""
  on_command_line = {o.split("=", 1)[0] for o in overrides}
  runtime = config_lib.RUNTIME_MODEL_KEYS
  fixed = [f"model.{k}={cfg.model[k]!r} (--init has {init_cfg.model[k]!r})"
           for k in init_cfg.model if k not in runtime and
           f"model.{k}" in on_command_line and cfg.model[k] != init_cfg.model[k]]
  if fixed:
    raise ConfigError(f"Fine-tuning keeps the --init run's model; drop {', '.join(fixed)}. Only "
                      f"model.{{{','.join(runtime)}}} may change.")
  default_model = config_lib.default_config().model
  model = init_cfg.model.to_dict()
  for k in runtime:  # the config's own choice (file or command line), else --init's
    if f"model.{k}" in on_command_line or cfg.model[k] != default_model[k]:
      model[k] = cfg.model[k]
  return model


def _data_of(cfg, init_cfg, init: str) -> dict:
  """The --init run's data section (`lmjax eval` of the result reads its corpus), with this
  config's seq_len and the tokenizer (the config's, else the init run's)."""
  init_tokenizer = workdir_lib.absolute(workdir_lib.tokenizer_path(init_cfg, init))
  init_tokenizer = init_tokenizer if os.path.isfile(init_tokenizer) else ""
  tokenizer = workdir_lib.absolute(cfg.data.tokenizer and workdir_lib.tokenizer_model_file(
      cfg.data.tokenizer)) or init_tokenizer
  if not tokenizer:
    raise ConfigError(f"The --init run ({init}) has no tokenizer (it trained on synthetic "
                      "tokens, or was imported without a tokenizer.json or tokenizer.model): set "
                      "--config.data.tokenizer=PATH to the tokenizer its vocabulary means.")
  data = init_cfg.data.to_dict()
  data.update(seq_len=cfg.data.seq_len, tokenizer=tokenizer, prepared_dir="")
  init_prepared = workdir_lib.prepared_dir(init_cfg, init)
  if tokenizer == init_tokenizer and os.path.isfile(os.path.join(init_prepared, workdir_lib.INDEX)):
    data["prepared_dir"] = workdir_lib.absolute(init_prepared)  # read, never written: same data
  return data


def with_init(cfg, workdir: str, overrides=()):
  """`cfg` with the model, tokenizer, data and objective of the run in cfg.finetune.init."""
  init, init_cfg = _init_run(cfg, workdir)
  out = config_lib.ConfigDict(cfg.to_dict())
  out.model = config_lib.ConfigDict(_model_of(cfg, init_cfg, overrides))
  for k in init_cfg.train:
    if k not in LOOP_TRAIN_KEYS:
      out.train[k] = init_cfg.train[k]
  out.train.sample_prompt = ""
  out.data = config_lib.ConfigDict(_data_of(cfg, init_cfg, init))
  out.finetune.init = init
  out.finetune.data = workdir_lib.absolute(cfg.finetune.data)
  out = config_lib.finalize(out)

  if not out.finetune.data:
    raise ConfigError("finetune.data is empty: set --config.finetune.data=PATH.jsonl.")
  if not epath.Path(out.finetune.data).exists():
    raise DataError(f"finetune.data={out.finetune.data} does not exist.")
  if out.finetune.task != "classification" and not out.model.causal:
    raise ConfigError(f"finetune.task={out.finetune.task} needs a causal LM, but the --init run ({init}) is a "
                      "bidirectional encoder (model.causal=False); use finetune.task="
                      "classification.")
  size = load_tokenizer(out.data.tokenizer).vocab_size
  if size > out.model.vocab_size:
    raise ConfigError(f"Vocabulary mismatch: the tokenizer {out.data.tokenizer} has {size} pieces "
                      f"but the --init model has model.vocab_size={out.model.vocab_size}. Use the "
                      "tokenizer the --init run was trained with (data.tokenizer).")
  return out


# --- the run ------------------------------------------------------------------------------------

def _describe(cfg, run, data) -> str:
  f = cfg.finetune
  how = f"LoRA rank {f.lora_rank} on {f.lora_targets}" if f.lora_rank else "all params"
  counts = ", ".join(f"{split} {s['examples']}" for split, s in data.stats.items()
                     if isinstance(s, dict) and s)
  if f.task != "classification":
    cut = sum(s.get("truncated", 0) for s in data.stats.values() if isinstance(s, dict))
    dropped = sum(s.get("dropped", 0) for s in data.stats.values() if isinstance(s, dict))
    limit = "data.seq_len + 1" if f.task == "sft" else "data.seq_len // 2 + 1 a side"
    counts += f"; {data.stats['train']['rows']} packed rows" + (
        f"; {cut} examples cut to {limit} tokens" if cut else "") + (
        f"; {dropped} left out (no response token within them)" if dropped else "")
  else:
    cut = sum(s.get("truncated", 0) for s in data.stats.values() if isinstance(s, dict))
    counts += f"; {len(data.labels)} classes" + (
        f"; {cut} texts cut to data.seq_len - 1 tokens (and eos)" if cut else "")
  return (f"Fine-tuning ({f.task}, {how}: {run.num_trainable / 1e6:.3f}M trainable) from "
          f"{f.init}; examples: {counts}.")


def finetune(cfg, workdir: str, progress: bool = True, stop_at_step: int | None = None) -> dict:
  """Fine-tunes (or resumes) into `workdir` from cfg.finetune.init; at the end writes the merged
  run. Returns the loop's result plus 'data' (example counts) and 'exported' (the step of
  WORKDIR/checkpoints, or None when stopped early)."""
  with lock.hold(workdir, "finetune", "lmjax finetune"):
    return _finetune(cfg, workdir, progress, stop_at_step)


def _finetune(cfg, workdir: str, progress: bool, stop_at_step: int | None) -> dict:
  workdir_lib.check_compatible(cfg, workdir)
  config_lib.check_tracking_installed(cfg.train)
  data = tasks.load_task_data(cfg)  # every data error before any compilation
  f = cfg.finetune
  objective = make_objective(f.task, num_classes=len(data.labels or ()), pooling=f.pooling,
                             beta=f.dpo_beta, dpo_loss=f.dpo_loss,
                             max_segments=data.stats.get("max_segments", 0))
  run = builder.build(cfg, objective, builder.FromRun(f.init))
  # DPO's reference: the init model (with LoRA, the base under the adapters: no second copy)
  frozen = None
  if objective.frozen and not f.lora_rank:
    frozen = builder.reference_model(run, f.init)
  eval_step = run.jit_eval_step(frozen)
  evaluate = None
  if data.val is not None:
    evaluate = lambda params: evaluate_lib.evaluate_rows(run, eval_step, params, data.val)
  rows = tasks.RowIterator(data.train, cfg.train.batch_size, cfg.train.seed, run.process_rows)
  log(_describe(cfg, run, data))
  result = loop.run_loop(run, workdir, run.jit_train_step(frozen), rows, evaluate,
                         progress=progress,
                         stop_at_step=stop_at_step,
                         checkpoint_dir=workdir_lib.checkpoint_dir(workdir, finetune_state=True),
                         format_eval=functools.partial(evaluate_lib.format_result,
                                                       objective=f.task))
  result["data"], result["exported"] = data.stats, None
  if result["stopped_by"] is None:
    result["exported"] = export(cfg, workdir, run, result["state"], data.labels)
  return result


def merged_params(run, params):
  """The model's params with the adapters merged in (W + A B scale): what a plain run computes
  the same logits with."""
  if "lora" not in params:
    return run.model_params(params)
  f = run.cfg.finetune
  return lora_lib.merge(params["model"], params["lora"], lora_lib.scale(f.lora_rank, f.lora_alpha))


def export(cfg, workdir: str, run, state, labels: list[str] | None = None) -> int:
  """Writes the merged params as WORKDIR/checkpoints/STEP (params only, as an import: a run
  continued from them makes its optimizer state), and for classification
  WORKDIR/classifier.npz. Returns the step."""
  step = int(jax.device_get(state.step))
  directory = workdir_lib.checkpoint_dir(workdir)
  with ckpt_lib.open_checkpoints(directory, cfg.train.keep_checkpoints) as checkpoints:
    done = step in checkpoints.all_steps()
  if done and (cfg.finetune.task != "classification" or
               workdir_lib.classifier_path(workdir).exists()):
    return step  # exported by an earlier invocation
  if not done:
    plain = builder.build(cfg, builder.pretraining_objective(cfg, workdir))
    base_shardings = plain.state_shardings.params
    with run.context():
      merged = jax.jit(lambda p: merged_params(run, p), out_shardings=base_shardings)(state.params)
    with ckpt_lib.open_checkpoints(directory, cfg.train.keep_checkpoints) as checkpoints:
      checkpoints.save_params(step, merged)  # params only, as an import
  if cfg.finetune.task == "classification":
    # gathered on every process (a head sharded across hosts), written by process 0
    head = jax.tree_util.tree_map(lambda x: to_host(x).astype(np.float32),
                                  state.params["head"])
  if cfg.finetune.task == "classification" and jax.process_index() == 0:
    with workdir_lib.classifier_path(workdir).open("wb") as out:
      np.savez(out, kernel=head["kernel"], bias=head["bias"], labels=np.asarray(labels),
               pooling=np.asarray(cfg.finetune.pooling))
  return step

"""Pretraining (`lmjax train`): a config and a workdir in, a trained (or resumed) run out.

  lock the workdir (lmjax.lock) -> check it -> prepare the data (process 0) -> build the run -> the loop -> a sample
"""
from __future__ import annotations

from etils import epath

from lmjax import builder
from lmjax import config as config_lib
from lmjax import data as data_lib
from lmjax import evaluate as evaluate_lib
from lmjax import generate
from lmjax import lock
from lmjax import loop
from lmjax import metrics as metrics_lib
from lmjax import workdir as workdir_lib
from lmjax.data.tokenizer import tokenizer_sha256
from lmjax.errors import ConfigError


def prepare_data(cfg, workdir: str) -> None:
  """Tokenizer and shards of a text corpus, made once by process 0 in the shared workdir (the
  others wait, then check they see the same)."""
  if cfg.data.source != "synthetic":
    data_lib.prepare_once(cfg, workdir)


def train(cfg, workdir: str, progress: bool = True, stop_at_step: int | None = None) -> dict:
  """Trains (or resumes) in `workdir`; returns the loop's result (last train and val metrics,
  the final state) and a sample of train.sample_prompt.

  `stop_at_step` ends this invocation early (with a checkpoint) as a preemption would, keeping
  the schedule of the full `train.steps`.
  """
  with lock.hold(workdir, "pretraining", "lmjax train"):
    return _train(cfg, workdir, progress, stop_at_step)


def with_teacher(cfg):
  """`lmjax distill`'s config: the student's, reading its data with the teacher's tokenizer
  (data.tokenizer, unless the student names one: then it must be the same)."""
  teacher = cfg.distill.teacher
  if not workdir_lib.has_run(teacher) or not workdir_lib.has_checkpoint(teacher):
    raise ConfigError(f"distill.teacher={teacher} holds no trained run (config.json and a "
                      "checkpoint): give the workdir of an `lmjax train` run or of `lmjax convert "
                      "--from_hf`.")
  teacher_cfg = workdir_lib.read_config(teacher)
  if cfg.data.source != "synthetic" and not cfg.data.tokenizer:
    cfg.data.tokenizer = workdir_lib.tokenizer_path(teacher_cfg, teacher)
  return cfg


def check_teacher(cfg) -> None:
  """The teacher must score the student's tokens: a causal LM of the same vocabulary and
  tokenizer, with a context as long as the student's windows."""
  teacher = cfg.distill.teacher
  t = workdir_lib.read_config(teacher)
  problem = None
  if not t.model.causal:
    problem = "it is a bidirectional encoder (model.causal=False), not a next-token model"
  elif t.model.vocab_size != cfg.model.vocab_size:
    problem = (f"its vocabulary has {t.model.vocab_size} entries (model.vocab_size), the "
               f"student's {cfg.model.vocab_size}: they must share a tokenizer")
  elif t.model.max_len < cfg.data.seq_len:
    problem = (f"its context (model.max_len={t.model.max_len}) is shorter than the student's "
               f"data.seq_len={cfg.data.seq_len}")
  elif cfg.data.source != "synthetic":
    mine, theirs = workdir_lib.tokenizer_path(cfg, ""), workdir_lib.tokenizer_path(t, teacher)
    if not cfg.data.tokenizer or not epath.Path(mine).exists() or not epath.Path(
        theirs).exists() or tokenizer_sha256(mine) != tokenizer_sha256(theirs):
      problem = (f"the student's tokenizer ({cfg.data.tokenizer or 'its own, to be trained'}) "
                 f"is not the teacher's ({theirs}): leave data.tokenizer unset to use the "
                 "teacher's")
  if problem:
    raise ConfigError(f"distill.teacher={teacher} cannot teach this student: {problem}.")


def _train(cfg, workdir: str, progress: bool, stop_at_step: int | None) -> dict:
  if cfg.distill.teacher:
    cfg = with_teacher(cfg)
    check_teacher(cfg)
  workdir_lib.check_compatible(cfg, workdir)
  config_lib.check_tracking_installed(cfg.train)
  run = builder.build(cfg, builder.pretraining_objective(cfg, workdir))  # errors before the data
  # the teacher's params on the student's mesh, before the data (its errors first)
  frozen = builder.frozen_model(cfg.distill.teacher, run)[1] if cfg.distill.teacher else None
  prepare_data(cfg, workdir)
  if cfg.train.objective == "masked_lm" or cfg.data.packing == "documents":
    # the mask token, or the eos that ends documents, is the prepared tokenizer's
    run = builder.build(cfg, builder.pretraining_objective(cfg, workdir))
  train_step, eval_step = run.jit_train_step(frozen), run.jit_eval_step()
  # a CPU's peak FLOP/s (for MFU) is measured: before the loader's workers start competing for it
  metrics_lib.peak_flops_total(run.mesh.devices.flatten())
  train_iter = data_lib.make_iterator(cfg, workdir, "train", run.process_rows)
  result = loop.run_loop(
      run, workdir, train_step, train_iter,
      lambda params: evaluate_lib.evaluate_split(run, workdir, eval_step, params),
      progress=progress, stop_at_step=stop_at_step)
  if not result["stopped_by"] and cfg.train.sample_prompt and cfg.data.source != "synthetic":
    result["sample"] = generate.sample_continuation(run, workdir, result["state"].params)
  return result


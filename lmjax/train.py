"""Pretraining (`lmjax train`): a config and a workdir in, a trained (or resumed) run out.

  lock the workdir (lmjax.lock) -> check it -> prepare the data (process 0) -> build the run -> the loop -> a sample
"""
from __future__ import annotations


from lmjax import builder
from lmjax import data as data_lib
from lmjax import evaluate as evaluate_lib
from lmjax import generate
from lmjax import lock
from lmjax import loop
from lmjax import metrics as metrics_lib
from lmjax import workdir as workdir_lib


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


def _train(cfg, workdir: str, progress: bool, stop_at_step: int | None) -> dict:
  workdir_lib.check_compatible(cfg, workdir)
  run = builder.build(cfg, builder.pretraining_objective(cfg, workdir))  # errors before the data
  prepare_data(cfg, workdir)
  if cfg.train.objective == "masked_lm" or cfg.data.packing == "documents":
    # the mask token, or the eos that ends documents, is the prepared tokenizer's
    run = builder.build(cfg, builder.pretraining_objective(cfg, workdir))
  train_step, eval_step = run.jit_train_step(), run.jit_eval_step()
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


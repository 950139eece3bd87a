"""lmjax eval --workdir=DIR [--step=N] [--batches=N]: a checkpoint on the validation split;
with --tasks=A,B: lm-evaluation-harness tasks on the latest checkpoint (the `harness` extra)."""
from __future__ import annotations

import json

from lmjax.commands import common

HELP = ("loss, perplexity and bits/byte (masked LM: masked-token accuracy) on the validation "
        "split")


def add_arguments(p) -> None:
  p.add_argument("--workdir", required=True, help="the run directory")
  p.add_argument("--step", type=common.at_least(0),
                 default=None, help="checkpoint step (default: latest)")
  p.add_argument("--batches", type=common.at_least(1), default=None, help="batches to evaluate "
                 "(default: train.eval_batches)")
  p.add_argument("--tasks", default="", help="lm-eval tasks (comma-separated) instead of the "
                 "validation split, e.g. hellaswag or a task of --include_path")
  p.add_argument("--include_path", default="", help="a directory of lm-eval task YAML files")
  p.add_argument("--num_fewshot", type=common.at_least(0), default=None)
  p.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task (or a "
                 "fraction)")
  p.add_argument("--batch_size", type=common.at_least(1), default=16,
                 help="lm-eval: requests scored or generated together")


def run_harness(args) -> int:
  from lmjax.errors import ConfigError
  try:
    from lmjax import harness
  except ImportError as e:
    raise ConfigError(f"--tasks needs lm-evaluation-harness ({e}): pip install "
                      "'lmjax[harness]'") from None
  out = harness.evaluate(args.workdir, args.tasks.split(","), args.include_path,
                         args.num_fewshot, args.limit, args.batch_size)
  for task, metrics in out["results"].items():
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                      if isinstance(v, float) and "stderr" not in k)
    print(f"{task}: {shown}")
  print(json.dumps({"tasks": out["results"]}, default=str))
  return 0


def run(args, overrides) -> int:
  if args.tasks:
    return run_harness(args)
  import jax

  from lmjax import distributed
  from lmjax import evaluate as evaluate_lib
  from lmjax import metrics as metrics_lib
  from lmjax import workdir as workdir_lib
  distributed.initialize_distributed(workdir_lib.load_config(args.workdir, overrides))
  step, result = evaluate_lib.evaluate_checkpoint(args.workdir, args.step, args.batches,
                                                  overrides)
  metrics_lib.log(evaluate_lib.format_result(step, result))
  metrics_lib.log(json.dumps({"step": step, "split": "val", **result}))
  writer = metrics_lib.MetricsWriter(args.workdir, enabled=jax.process_index() == 0,
                                     tensorboard=False)
  writer.write(step, "val", **result)
  return 0

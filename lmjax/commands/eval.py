"""lmjax eval --workdir=DIR [--step=N] [--batches=N]: a checkpoint on the validation split."""
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


def run(args, overrides) -> int:
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

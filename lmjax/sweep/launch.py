"""Cluster launch commands for a sweep's unfinished points, through launch/ (SLURM, TPU slices)."""
from __future__ import annotations

import shlex

from lmjax.errors import ConfigError, UsageError
from lmjax.sweep.plan import make_plan
from lmjax.sweep.runner import data_ready
from lmjax.sweep.state import check_point_config, status


def launch_commands(s, spec: str, workdir: str, overrides=(), kind: str = "slurm") -> list[str]:
  """Shell commands that run the unfinished points through launch/: `slurm`, one sbatch job per
  point (the scheduler runs them side by side); `tpu`, the whole sweep on one slice, the points
  one after another, each on every chip."""
  points, _ = make_plan(s, workdir)  # every point's config is checked
  flags = [f"--config={spec}", f"--workdir={workdir}"] + [f"--config.{o}" for o in overrides]
  if kind == "tpu":  # the sweep on the slice skips and resumes points itself
    if "://" not in workdir:
      raise ConfigError("A TPU slice's workers share the sweep through a bucket: pass "
                        "--workdir=gs://BUCKET/sweeps/NAME.")
    return [shlex.join(["launch/tpu.sh", "sweep", *flags])]
  for p in points:
    check_point_config(p)
  todo = [p for p in points if status(p) != "done"]
  if kind == "slurm":
    lines, after = [], []
    if todo and not data_ready(points[0].cfg):
      # one job prepares the shared tokenizer and shards; the points wait for it (afterok)
      lines.append("prep=$(" + shlex.join(["sbatch", "--parsable", "--job-name=lmjax-prepare",
                                           "launch/slurm.sbatch", "sweep", *flags,
                                           "--prepare_only"]) + ")")
      after = ["--dependency=afterok:${prep%%;*}"]
    for p in todo:
      command = shlex.join(["sbatch", f"--job-name=lmjax-{p.name}", "launch/slurm.sbatch",
                            "sweep", *flags, f"--point={p.name}"])
      if after:  # the dependency's ${...} must reach the shell unquoted
        command = command.replace("sbatch ", f"sbatch {after[0]} ", 1)
      lines.append(command)
    return lines
  raise UsageError(f"--launch must be slurm or tpu, got '{kind}'.")

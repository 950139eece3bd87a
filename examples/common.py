"""What the three examples share, on lmjax's own stack: the command line (`--workdir`,
`--config=FILE.py`, `--config.KEY=VALUE` overrides, lmjax's loader and type checks), a loop with
Orbax checkpoints (lmjax's Checkpointer: resume, and a clear error for a checkpoint of another
model), metrics.jsonl + TensorBoard (lmjax's MetricsWriter), scikit-learn's 8x8 digits and PNG
image grids.

An example supplies `init(cfg) -> state` (a pytree), a jitted `step(state, batch, rng) ->
(state, metrics)`, `batch_at(step) -> batch` (a function of the seed and the step only, so the
data position of a resumed run is its step) and `evaluate(state) -> {name: number}`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from lmjax import checkpoint, config as config_lib, metrics, workdir as workdir_lib
from lmjax.errors import ConfigError, LmjaxError, UsageError

# keys that may change when a run resumes: they change how often it reports, not what it learns
REPORTING = ("log_every", "eval_every", "checkpoint_every")


def command_line(argv, default_config: str):
  """(config, workdir) from `--workdir=DIR [--config=FILE.py[:ARG]] [--config.KEY=VALUE ...]`."""
  rest = [a for a in argv if not a.startswith("--config.")]
  overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
  name = os.path.basename(os.path.dirname(default_config))
  p = argparse.ArgumentParser(prog=f"python -m examples.{name}.train",
                              epilog="Override any key of the config with --config.KEY=VALUE.")
  p.add_argument("--workdir", required=True, help="run directory (resumes if it holds a run)")
  p.add_argument("--config", default=default_config, metavar="FILE.py[:ARG]",
                 help=f"config file (default: {os.path.relpath(default_config)}, which "
                 "comments every key)")
  args = p.parse_args(rest)
  cfg = config_lib.load_config_file(args.config)
  unknown = [o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0] not in cfg]
  if unknown:
    raise ConfigError(f"Unknown config key {unknown[0]!r}; {args.config}'s keys are "
                      f"{', '.join(sorted(cfg))}.")
  return config_lib.apply_overrides(cfg, overrides), args.workdir


def check_workdir(cfg, workdir: str) -> None:
  """Raises unless WORKDIR is new or holds a run of this config (bar the REPORTING keys and
  `steps`, which may grow to train further). Writes nothing: an example calls it first."""
  path = workdir_lib.config_path(workdir)
  if not path.exists():
    return
  saved = json.loads(path.read_text())
  if set(saved) != set(cfg):
    raise ConfigError(f"{workdir} holds another kind of run ({path} has other keys); pass a "
                      "new --workdir.")
  wanted = json.loads(json.dumps(cfg.to_dict()))  # as saved: tuples are lists
  changed = sorted(k for k in saved if k not in REPORTING + ("steps",) and saved[k] != wanted[k])
  if changed:
    raise ConfigError(f"{workdir} holds a run with another config (changed: {', '.join(changed)}; "
                      f"see {path}); pass a new --workdir, or the same config to resume it.")


def describe(step: int, val: dict) -> str:
  return f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items())


def train(cfg, workdir: str, state, step, batch_at, evaluate, stop_at_step: int | None = None,
          describe=describe):
  """Trains `state` to cfg.steps from WORKDIR/checkpoints' latest step (if any), with train
  records every cfg.log_every steps, evaluation every cfg.eval_every and at the end (printed by
  `describe(step, val)`), and a checkpoint every cfg.checkpoint_every and at the end.
  `stop_at_step` stops early (as a kill would, after that step's checkpoint if it has one).
  Returns (state, the last val metrics)."""
  check_workdir(cfg, workdir)
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.config_path(workdir).write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=device), state)
  writer = metrics.MetricsWriter(workdir)
  val = {}
  with checkpoint.open_checkpoints(workdir_lib.checkpoint_dir(workdir), keep=2) as saved:
    start = saved.latest_step() or 0
    if start:
      state, _ = saved.restore(start, abstract)
      metrics.log(f"resumed from step {start} ({workdir})")
    else:  # where it starts
      writer.write(0, "val", **(val := evaluate(state)))
      metrics.log(describe(0, val))
    rng, done = jax.random.key(cfg.seed + 1), start
    for i in range(start, stop_at_step or cfg.steps):
      state, train_metrics = step(state, batch_at(i), jax.random.fold_in(rng, i))
      done = i + 1
      if done % cfg.log_every == 0:
        writer.write(done, "train", **jax.device_get(train_metrics))
      if done % cfg.eval_every == 0 or done == cfg.steps:
        val = evaluate(state)
        writer.write(done, "val", **val)
        metrics.log(describe(done, val))
      if done % cfg.checkpoint_every == 0 or done == cfg.steps:
        saved.save(done, state, {"step": done})
  writer.close()
  if not val:  # nothing was evaluated on the way: say where it stands
    val = evaluate(state)
    metrics.log(describe(done, val))
  return state, val


def main(run, argv, default_config: str) -> None:
  """`run(cfg, workdir)` from the command line; an lmjax error is one line and exit status 2."""
  try:
    run(*command_line(sys.argv[1:] if argv is None else argv, default_config))
  except LmjaxError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


# --- data and pictures --------------------------------------------------------------------------

def digits(val_fraction: float, seed: int) -> dict:
  """scikit-learn's 1,797 bundled 8x8 digit images (no download), split by `seed`: {train, val}
  float32 [N, 64] in [0, 1] and {train_labels, val_labels} int [N] (the digit)."""
  try:
    from sklearn.datasets import load_digits
  except ImportError:
    raise UsageError("The examples read scikit-learn's bundled digits: "
                     "pip install -e \".[examples]\"") from None
  bunch = load_digits()
  images, labels = bunch.data.astype(np.float32) / 16.0, bunch.target
  order = np.random.default_rng(seed).permutation(len(images))
  val, train = order[:round(len(images) * val_fraction)], order[round(len(images) * val_fraction):]
  return {"train": images[train], "val": images[val], "train_labels": labels[train],
          "val_labels": labels[val]}


def batch_indices(num_rows: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """The rows of the `step`th batch of an endless sequence of epochs, each a fresh permutation
  by (seed, epoch): the same batch for the same step, resumed or not."""
  if num_rows < batch_size:
    raise ConfigError(f"batch_size={batch_size} is more than the {num_rows} training rows.")
  epoch, k = divmod(step, num_rows // batch_size)
  order = np.random.default_rng([seed, epoch]).permutation(num_rows)
  return order[k * batch_size:(k + 1) * batch_size]


def image_grid(images, path: str, columns: int = 10) -> str:
  """Writes [N, 64] images in [0, 1] as a PNG grid of 8x8 tiles (scaled 4x, 1-pixel gutters)."""
  from lmjax.plotting import pyplot
  images = np.clip(np.asarray(images, np.float32).reshape(-1, 8, 8), 0, 1)
  rows = -(-len(images) // columns)
  grid = np.ones((rows * 9 + 1, columns * 9 + 1), np.float32)
  for i, image in enumerate(images):
    r, c = divmod(i, columns)
    grid[1 + r * 9:1 + r * 9 + 8, 1 + c * 9:1 + c * 9 + 8] = 1.0 - image  # dark ink on white
  grid = np.kron(grid, np.ones((4, 4), np.float32))
  pyplot().imsave(path, grid, cmap="gray", vmin=0.0, vmax=1.0)
  return path

"""Orbax checkpoints: the train state (params, optimizer state, step, RNG) and the data position.

Orbax writes each step into a temporary directory and renames it when complete, so a half-written
checkpoint (a killed process, a full disk) is never listed and never loaded.
"""
from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

from lmjax.config import ConfigError


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir) if "://" not in workdir else workdir, "checkpoints")


def _not_read_only_notice(record: logging.LogRecord) -> bool:
  """Orbax warns that a read-only manager is read-only and keeps every step: that is the point."""
  return not record.getMessage().startswith(("Given directory is read only",
                                             "CheckpointManagerOptions.read_only=True"))


logging.getLogger("absl").addFilter(_not_read_only_notice)


class Checkpointer:

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, read_only=False):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           enable_async_checkpointing=async_save,
                                           read_only=read_only)
    self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                         item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict | None, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state or {}))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int | None, abstract_state):
    """Restores onto the shardings in `abstract_state` (ShapeDtypeStructs with .sharding)."""
    step = self.latest_step() if step is None else step
    if step is None or step not in self.manager.all_steps():
      raise ConfigError(f"No checkpoint for step {step} in {self.manager.directory}; "
                        f"available: {self.all_steps() or 'none'}.")
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore())
    try:
      restored = self.manager.restore(step, args=args)
    except (ValueError, KeyError, TypeError) as e:
      raise ConfigError(
          f"The checkpoint at step {step} in {self.manager.directory} does not match this model "
          f"and optimizer ({type(e).__name__}: {str(e)[:300]}). Use the config it was trained "
          "with (see config.json beside it) or a new --workdir.") from None
    return restored.state, dict(restored.data or {})

  def restore_params(self, step: int | None, abstract_params):
    """Only the params of a checkpoint (nothing else is read), onto `abstract_params`' shardings
    (fine-tuning starts from a run's params; generation needs no optimizer state)."""
    step = self.latest_step() if step is None else step
    if step is None or step not in self.manager.all_steps():
      raise ConfigError(f"No checkpoint for step {step} in {self.manager.directory}; "
                        f"available: {self.all_steps() or 'none'}.")
    restore_args = jax.tree_util.tree_map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
        abstract_params)
    args = ocp.args.PyTreeRestore(item={"params": abstract_params},
                                  restore_args={"params": restore_args}, partial_restore=True)
    try:
      restored = ocp.PyTreeCheckpointer().restore(
          os.path.join(str(self.manager.directory), str(step), "state"), args=args)
    except (ValueError, KeyError, TypeError) as e:
      raise ConfigError(
          f"The params at step {step} in {self.manager.directory} do not match this model "
          f"({type(e).__name__}: {str(e)[:300]}).") from None
    return restored["params"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(tree, shardings):
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

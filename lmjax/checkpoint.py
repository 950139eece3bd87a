"""Orbax checkpoints: the train state (params, optimizer state, step, RNG) and the data position,
or params alone (an import: `save_params`).

Orbax writes each step into a temporary directory and renames it when complete, so a half-written
checkpoint (a killed process, a full disk) is never listed and never loaded. Before restoring,
the checkpoint's own metadata is compared with what the config builds, so that a checkpoint of
another model is named as such, and one that cannot be read says why.

Open checkpoints with `open_checkpoints(directory, ...)`; the directory comes from
`workdir.checkpoint_dir`.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import jax
import orbax.checkpoint as ocp

from lmjax.errors import CheckpointError


def _not_read_only_notice(record: logging.LogRecord) -> bool:
  """Orbax warns that a read-only manager is read-only and keeps every step: that is the point."""
  return not record.getMessage().startswith(("Given directory is read only",
                                             "CheckpointManagerOptions.read_only=True"))


logging.getLogger("absl").addFilter(_not_read_only_notice)


def _key_name(key) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _shapes(tree) -> dict[str, tuple]:
  """{"a/b/0/c": shape} of every array leaf (abstract arrays and Orbax metadata alike)."""
  return {"/".join(_key_name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
          if hasattr(leaf, "shape")}


def _brief(e: Exception, limit: int = 240) -> str:
  """An exception as one short line (Orbax's and TensorStore's run over several)."""
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def mismatches(saved: dict, wanted: dict, limit: int = 6) -> list[str]:
  """How two {path: shape} maps differ, a line each (at most `limit`)."""
  lines = [f"{p}: {saved[p]} in the checkpoint, {wanted[p]} here" for p in wanted
           if p in saved and saved[p] != wanted[p]]
  lines += [f"{p}: missing from the checkpoint" for p in wanted if p not in saved]
  lines += [f"{p}: in the checkpoint only" for p in saved if p not in wanted]
  return lines[:limit] + ([f"... ({len(lines) - limit} more)"] if len(lines) > limit else [])


class Checkpointer:
  """A CheckpointManager over `directory` with items "state" (the train state) and "data" (the
  data iterator's position, JSON)."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           enable_async_checkpointing=async_save,
                                           read_only=read_only)
    self.directory = directory
    # handlers named up front: a manager that only reads can then read the items' metadata
    self.manager = ocp.CheckpointManager(
        directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict | None, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state or {}))
    return self.manager.save(step, args=args, force=force)

  def save_params(self, step: int, params) -> bool:
    """Params alone, no optimizer state, RNG or data position (an import: training creates the
    optimizer state it needs, `params_only`)."""
    return self.save(step, {"params": params}, None, force=True)

  def params_only(self, step: int) -> bool:
    """Whether the checkpoint at `step` holds params alone (written by `save_params`)."""
    try:
      saved = self.manager.item_metadata(step)["state"]
    except Exception:  # noqa: BLE001 - unreadable metadata is reported by restore
      return False
    return set(getattr(saved, "tree", saved) or ()) == {"params"}

  def existing_step(self, step: int | None) -> int:
    """`step` (None: the latest), if there is a checkpoint for it."""
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"No checkpoint in {self.directory}: train first, or check the "
                            "--workdir.")
    step = self.latest_step() if step is None else step
    if step not in steps:
      raise CheckpointError(f"No checkpoint for step {step} in {self.directory}; available: "
                            f"{steps}. Check --step.")
    return step

  def _check_matches(self, step: int, abstract, subtree: str | None = None) -> None:
    """The checkpoint's own metadata against the tree the config builds."""
    try:
      saved = self.manager.item_metadata(step)["state"]
      saved = getattr(saved, "tree", saved)
      saved = saved[subtree] if subtree else saved
    except Exception as e:  # noqa: BLE001 - any failure to read it means the same to the user
      raise CheckpointError(
          f"The checkpoint at step {step} in {self.directory} has unreadable metadata "
          f"({_brief(e)}): it is damaged or incomplete. Delete that step's directory to use an "
          "earlier one.") from e
    diffs = mismatches(_shapes(saved), _shapes(abstract))
    if diffs:
      raise CheckpointError(
          f"The checkpoint at step {step} in {self.directory} holds another model or optimizer "
          "than this config builds:\n  " + "\n  ".join(diffs) + "\nUse the config it was trained "
          "with (config.json beside it) or a new --workdir.")

  def _unreadable(self, step: int, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"The checkpoint at step {step} in {self.directory} cannot be read ({_brief(e)}): its "
        "files are damaged or incomplete. Delete that step's directory to use an earlier one.")

  def restore(self, step: int | None, abstract_state):
    """(state, data position) onto the shardings in `abstract_state` (ShapeDtypeStructs with
    .sharding)."""
    step = self.existing_step(step)
    self._check_matches(step, abstract_state)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore())
    try:
      restored = self.manager.restore(step, args=args)
    except Exception as e:  # noqa: BLE001 - the files themselves: see _unreadable
      raise self._unreadable(step, e) from e
    return restored.state, dict(restored.data or {})

  def restore_params(self, step: int | None, abstract_params):
    """Only the params of a checkpoint (the optimizer state is not read), onto
    `abstract_params`' shardings: for commands that only read a model."""
    step = self.existing_step(step)
    self._check_matches(step, abstract_params, subtree="params")
    restore_args = jax.tree_util.tree_map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
        abstract_params)
    args = ocp.args.PyTreeRestore(item={"params": abstract_params},
                                  restore_args={"params": restore_args}, partial_restore=True)
    try:
      with ocp.PyTreeCheckpointer() as reader:
        restored = reader.restore(os.path.join(str(self.manager.directory), str(step), "state"),
                                  args=args)
    except Exception as e:  # noqa: BLE001 - the files themselves: see _unreadable
      raise self._unreadable(step, e) from e
    return restored["params"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


@contextlib.contextmanager
def open_checkpoints(directory: str, keep: int = 3, read_only: bool = False,
                     async_save: bool = True) -> Iterator[Checkpointer]:
  """A Checkpointer that waits for its saves and closes when the block ends."""
  checkpointer = Checkpointer(directory, keep, async_save=async_save, read_only=read_only)
  try:
    yield checkpointer
  finally:
    checkpointer.close()


def latest_step(directory: str) -> int | None:
  with open_checkpoints(directory, read_only=True) as checkpointer:
    return checkpointer.latest_step()


def abstract_with_shardings(tree, shardings):
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

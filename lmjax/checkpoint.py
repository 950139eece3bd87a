"""Orbax checkpoints: the train state (params, optimizer state, step, RNG) and the data position, or
params alone (an import: `save_params`).

Orbax writes each step into a temporary directory and renames it when complete, so a half-written
checkpoint (a killed process, a full disk) is never listed and never loaded. Once a step is
complete, process 0 seals it: STEP/lmjax_checksums.json records every file's size and CRC-32
(`seal`, in a background thread from the next save on, or at close). Before restoring,
`newest_good_step` verifies the seals from the newest step down and moves a step whose files do not
match (truncated, garbled, deleted) aside to CHECKPOINTS-damaged/STEP with a NOTE, never deleting
it; the checkpoint's own metadata is then compared with what the config builds, so that a checkpoint
of another model is named as such, and one that cannot be read says why (`CheckpointError.damaged`).

Open checkpoints with `open_checkpoints(directory, ...)`; the directory comes from
`workdir.checkpoint_dir`.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
import time
from typing import Iterator
import zlib

from etils import epath
import jax
import orbax.checkpoint as ocp

from lmjax import distributed
from lmjax.errors import CheckpointError

SEAL = "lmjax_checksums.json"  # in each step's directory once it is complete
NOTE = "NOTE.txt"  # beside a damaged step that was moved aside


def _damaged(message: str) -> CheckpointError:
  """A CheckpointError for files that cannot be read (not a config mismatch): restoring falls
  back to an earlier step."""
  error = CheckpointError(message)
  error.damaged = True
  return error


def _files(directory: epath.Path) -> dict[str, epath.Path]:
  """Every file under a step directory, by its path relative to it (the seal excluded)."""
  out = {}
  for root, _, names in directory.walk():
    for name in names:
      path = epath.Path(root) / name
      rel = os.path.relpath(os.fspath(path), os.fspath(directory))
      if rel != SEAL:
        out[rel] = path
  return out


def _crc32(path: epath.Path) -> str:
  crc = 0
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      crc = zlib.crc32(block, crc)
  return f"{crc:08x}"


def _not_read_only_notice(record: logging.LogRecord) -> bool:
  """Orbax warns that a read-only manager is read-only and keeps every step: that is the point.
  Its background threads also log each failure with a traceback, before the failure reaches the
  loop, which reports it as one line (`Checkpointer._surfaced`)."""
  message = record.getMessage()
  if record.exc_info and record.exc_info[1] is not None:
    message += str(record.exc_info[1])
  return not (message.startswith(("Given directory is read only",
                                  "CheckpointManagerOptions.read_only=True")) or
              "_SignalingThread.run() raised an exception" in message or
              "No space left on device" in message)


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
    self.directory, self.read_only, self.saving = directory, read_only, None
    self._sealer = None  # the thread sealing finished steps while training goes on
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
    self._surfaced(self.manager.wait_until_finished)  # Orbax would wait here anyway
    self._seal_in_background()
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state or {}))
    self.saving = step
    return self._surfaced(lambda: self.manager.save(step, args=args, force=force))

  def check_for_errors(self) -> None:
    """Raises now if a save running in the background has failed (it does not wait for it)."""
    self._surfaced(self.manager.check_for_errors)

  def _complete_steps(self) -> list[int]:
    directory = epath.Path(self.directory)
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if (
        directory.exists()) else []

  def _surfaced(self, call):
    """`call()`, with a full disk reported as one CheckpointError that names the step that
    failed and the last complete one (Orbax raises it from its threads, at the next call)."""
    try:
      return call()
    except Exception as e:
      if getattr(e, "errno", None) != errno.ENOSPC and "No space left on device" not in str(e):
        raise
      steps = self._complete_steps()
      raise CheckpointError(
          f"Saving the checkpoint of step {self.saving} to {self.directory} failed: no space "
          f"left on device. The last complete checkpoint is step "
          f"{steps[-1] if steps else None}. Free space (or lower train.keep_checkpoints), then "
          "rerun: it resumes from there.") from None

  def _step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(step)

  def seal(self, steps=None) -> None:
    """Records the size and CRC-32 of every file of each complete step (default: all) that has
    no seal yet (process 0; Orbax lists a step only once all processes finished writing it)."""
    if jax.process_index() != 0:
      return
    for step in self.all_steps() if steps is None else steps:
      seal = self._step_dir(step) / SEAL
      if seal.exists():
        continue
      files = {rel: [path.stat().length, _crc32(path)]
               for rel, path in sorted(_files(self._step_dir(step)).items())}
      partial = seal.with_name(SEAL + ".tmp")
      partial.write_text(json.dumps({"files": files}))
      partial.replace(seal)

  def _seal_in_background(self) -> None:
    """Seals the complete steps in a thread, so that reading a large checkpoint back does not
    hold up training (joined before anything reads the seals or the run ends)."""
    if jax.process_index() != 0 or (self._sealer and self._sealer.is_alive()):
      return  # the steps it leaves are sealed next time

    def seal_quietly(steps):
      try:
        self.seal(steps)
      except OSError:  # a step Orbax removed meanwhile (max_to_keep): nothing to seal
        pass

    self._sealer = threading.Thread(target=seal_quietly, args=(self.all_steps(),), daemon=True,
                                    name="lmjax-seal")
    self._sealer.start()

  def _join_sealer(self) -> None:
    if self._sealer is not None:
      self._sealer.join()
      self._sealer = None

  def verify(self, step: int) -> str | None:
    """Why the files of `step` do not match its seal, or None (also for a step without a seal:
    an older checkpoint, or one whose run was killed before sealing it)."""
    seal = self._step_dir(step) / SEAL
    if not seal.exists():
      return None
    try:
      recorded = json.loads(seal.read_text())["files"]
    except (ValueError, KeyError) as e:
      return f"its checksum file {seal} is damaged ({e})"
    present = _files(self._step_dir(step))
    for rel, (size, crc) in recorded.items():
      if rel not in present:
        return f"{rel} is missing"
      if present[rel].stat().length != size:
        return f"{rel} is {present[rel].stat().length} bytes, {size} when saved"
      if _crc32(present[rel]) != crc:
        return f"{rel} does not have the contents it was saved with (CRC-32)"
    return None

  def move_aside(self, step: int, reason: str) -> str:
    """Moves a damaged step out of the checkpoint directory, with a note; returns where."""
    self._join_sealer()
    aside = epath.Path(str(self.directory).rstrip("/") + "-damaged")
    if jax.process_index() == 0:
      aside.mkdir(parents=True, exist_ok=True)
      target = aside / str(step)
      if target.exists():
        target = aside / f"{step}.{int(time.time())}"
      self._step_dir(step).rename(target)
      (target / NOTE).write_text(f"Step {step} was moved here from {self.directory} on "
                                 f"{time.ctime()}: {reason}\n")
    self.manager.reload()
    return os.fspath(aside)

  def newest_good_step(self) -> tuple[int | None, list[str]]:
    """(the newest step whose files match their seal, or None; a line for each newer step that
    did not and was moved aside). Process 0 verifies; every process gets its answer."""
    def find() -> str:
      moved = []
      for step in sorted(self.all_steps(), reverse=True):
        problem = self.verify(step)
        if problem is None:
          return json.dumps({"step": step, "moved": moved})
        where = self.move_aside(step, problem)
        moved.append(f"Checkpoint step {step} is damaged ({problem}): moved to {where}.")
      return json.dumps({"step": None, "moved": moved})
    found = json.loads(distributed.share_from_process_0(find, "checkpoint-verify"))
    if jax.process_index() > 0:
      self.manager.reload()
    return found["step"], found["moved"]

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
      raise _damaged(
          f"The checkpoint at step {step} in {self.directory} has unreadable metadata "
          f"({_brief(e)}): it is damaged or incomplete.") from e
    diffs = mismatches(_shapes(saved), _shapes(abstract))
    if diffs:
      raise CheckpointError(
          f"The checkpoint at step {step} in {self.directory} holds another model or optimizer "
          "than this config builds:\n  " + "\n  ".join(diffs) + "\nUse the config it was trained "
          "with (config.json beside it) or a new --workdir.")

  def _unreadable(self, step: int, e: Exception) -> CheckpointError:
    return _damaged(
        f"The checkpoint at step {step} in {self.directory} cannot be read ({_brief(e)}): its "
        "files are damaged or incomplete.")

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
    problem = self.verify(step)
    if problem:  # a read-only command does not move it: training does, and falls back
      raise _damaged(f"The checkpoint at step {step} in {self.directory} is damaged ({problem}). "
                     f"Pass an earlier --step (available: {self.all_steps()}), or rerun `lmjax "
                     "train`, which moves it aside and resumes from the step before.")
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
    self._surfaced(self.manager.wait_until_finished)
    self._join_sealer()
    self.seal()

  def close(self) -> None:
    try:
      self._surfaced(self.manager.wait_until_finished)
      self._join_sealer()
      if not self.read_only:
        self.seal()
    finally:
      self.manager.close()


@contextlib.contextmanager
def open_checkpoints(directory: str, keep: int = 3, read_only: bool = False,
                     async_save: bool = True) -> Iterator[Checkpointer]:
  """A Checkpointer that waits for its saves and closes when the block ends."""
  checkpointer = Checkpointer(directory, keep, async_save=async_save, read_only=read_only)
  try:
    yield checkpointer
  except BaseException:
    with contextlib.suppress(Exception):  # the error in flight is the one to report
      checkpointer.close()
    raise
  checkpointer.close()


def latest_step(directory: str) -> int | None:
  with open_checkpoints(directory, read_only=True) as checkpointer:
    return checkpointer.latest_step()


def abstract_with_shardings(tree, shardings):
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

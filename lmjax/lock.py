"""A workdir's lock: one run writes into a workdir at a time, and only a run of the workdir's kind.

`hold(workdir, kind, command)` is held by train, finetune, sweep and an import for their whole
life (by process 0 of a multi-host run; the other processes refuse with it). It first refuses a
workdir of another kind (a pretraining run, a fine-tuning, a sweep: `workdir.kind`), then takes

  local workdir   an flock on WORKDIR/.lock: the kernel drops it when the holder dies, however it
                  dies, so a killed run never leaves it stuck (the file is removed on release);
  bucket (gs://)  a lease, WORKDIR/lock.json, with the holder's host, pid and an expiry that a
                  background thread renews every LEASE_S / 3 seconds: a killed holder's lease
                  lapses after LEASE_S.

A second run on a held workdir refuses before it writes anything, naming the holder.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import threading
import time
import uuid

from etils import epath
import jax

from lmjax import distributed
from lmjax import workdir as workdir_lib
from lmjax.errors import ConfigError

LOCK_FILE = ".lock"
LEASE_FILE = "lock.json"
LEASE_S = 300.0


def _holder(command: str) -> dict:
  return {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now().isoformat(timespec="seconds")}


def _in_use(workdir: str, holder: dict | None) -> ConfigError:
  who = (f"`{holder.get('command')}` (pid {holder.get('pid')} on {holder.get('host')}, since "
         f"{holder.get('started')})") if holder else "another run"
  return ConfigError(f"'{workdir}' is in use by {who}. Wait for it to finish (or stop it), or use "
                     "another --workdir. Nothing was changed.")


class _FileLock:
  """flock on WORKDIR/.lock; the file holds the holder's description."""

  def __init__(self, workdir: str, command: str):
    self.workdir, self.command = workdir, command
    self.created = not os.path.isdir(workdir)
    self.path = os.path.join(workdir, LOCK_FILE)
    self.fd = None

  def acquire(self) -> None:
    try:
      os.makedirs(self.workdir, exist_ok=True)
    except OSError as e:  # a file there or above it, or no permission
      raise ConfigError(f"--workdir '{self.workdir}' cannot be a run directory ({e.strerror}): "
                        "pass a directory (a new or an existing run's).") from None
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        try:
          holder = json.loads(os.read(fd, 1 << 16) or b"null")
        except ValueError:
          holder = None
        os.close(fd)
        raise _in_use(self.workdir, holder) from None
      # the file may have been removed by the holder that just released it: lock the current one
      if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
        break
      os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(_holder(self.command)).encode())
    self.fd = fd

  def release(self) -> None:
    """Removes the lock file (a run that waited on it locks the new file instead: see acquire),
    and the workdir if this lock created it and nothing was written there."""
    if self.fd is None:
      return
    os.remove(self.path)
    if self.created and not os.listdir(self.workdir):
      os.rmdir(self.workdir)
    os.close(self.fd)  # closing drops the flock
    self.fd = None


class _Lease:
  """WORKDIR/lock.json in a bucket, renewed in the background until released."""

  def __init__(self, workdir: str, command: str):
    self.workdir, self.command = workdir, command
    self.path = epath.Path(workdir) / LEASE_FILE
    self.id = uuid.uuid4().hex
    self.done = threading.Event()
    self.thread = None

  def _read(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except (FileNotFoundError, ValueError):
      return None

  def _write(self) -> None:
    self.path.write_text(json.dumps({**_holder(self.command), "id": self.id,
                                     "expires": time.time() + LEASE_S}))

  def acquire(self) -> None:
    held = self._read()
    if held and held.get("id") != self.id and held.get("expires", 0) > time.time():
      raise _in_use(self.workdir, held)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._write()
    self.thread = threading.Thread(target=self._renew, daemon=True, name="lmjax-lease")
    self.thread.start()

  def _renew(self) -> None:
    while not self.done.wait(LEASE_S / 3):
      self._write()

  def release(self) -> None:
    self.done.set()
    if self.thread is not None:
      self.thread.join()
      if (self._read() or {}).get("id") == self.id:
        self.path.unlink(missing_ok=True)
      self.thread = None


def check_kind(workdir: str, kind: str) -> None:
  """Refuses a workdir that holds a run of another kind than `kind`."""
  found = workdir_lib.kind(workdir)
  if found not in (None, kind):
    raise ConfigError(f"'{workdir}' holds a {found} run (made by "
                      f"`{workdir_lib.KIND_COMMANDS[found]}`), which "
                      f"`{workdir_lib.KIND_COMMANDS[kind]}` does not write into. Use a new "
                      "--workdir. Nothing was changed.")


@contextlib.contextmanager
def hold(workdir: str, kind: str, command: str):
  """The workdir for a run of `kind` (see the module docstring), held until the block ends."""
  lock = None

  def take():
    nonlocal lock
    if jax.process_index() == 0:
      check_kind(workdir, kind)
      holder = (_Lease if workdir_lib.is_remote(workdir) else _FileLock)(
          workdir_lib.absolute(str(workdir)), command)
      holder.acquire()
      lock = holder

  distributed.check_everywhere(take, "workdir-lock")  # all refuse, or none
  try:
    yield
  finally:
    if lock is not None:
      lock.release()

"""What a sweep directory holds: which points are done, partial or new, and their results."""
from __future__ import annotations

import json
import os
import socket

from lmjax import workdir as workdir_lib
from lmjax.errors import DataError
from lmjax.sweep.plan import Point


def check_point_config(point: Point) -> None:
  """A point that started with other settings is not silently continued or reused."""
  workdir_lib.check_compatible(
      point.cfg, point.workdir, every_key=True,
      hint=f"Sweep point '{point.name}': use a new --workdir for the changed sweep, or delete "
           "that point's directory to retrain it.")


def read_result(point: Point) -> dict | None:
  path = workdir_lib.result_path(point.workdir)
  return workdir_lib.read_json(path, "a sweep point's result") if path.exists() else None


def status(point: Point) -> str:
  """done (result written) | partial (checkpoints, no result) | new."""
  if read_result(point) is not None:
    return "done"
  if workdir_lib.has_checkpoint(point.workdir):
    return "partial"
  return "new"


def write_results(points: list[Point], workdir: str) -> list[dict]:
  """Rebuilds DIR/results.jsonl from the finished points' result.json (whole file, then renamed:
  a reader never sees half of it)."""
  results = [r for r in (read_result(p) for p in points) if r is not None]
  path = workdir_lib.sweep_results_path(workdir)
  # a name of its own: sweep jobs on several nodes may rebuild the file at the same time
  tmp = path.parent / f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp"
  tmp.write_text("".join(json.dumps(r) + "\n" for r in results))
  tmp.replace(path)
  return results


def read_results(workdir: str) -> list[dict]:
  path = workdir_lib.sweep_results_path(workdir)
  if not path.exists():
    raise DataError(f"No {path}: run `lmjax sweep --config=... --workdir={workdir}` first (it "
                      "writes a line for every finished point).")
  return workdir_lib.read_json(path, "the sweep's results", lines=True)

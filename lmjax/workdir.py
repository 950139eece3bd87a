"""A run directory's layout, the one place that knows every path in it, and whether a config may use
a workdir (the one compatibility check).

  WORKDIR/
    config.json                  the resolved config; its presence marks a run
    checkpoints/STEP/            Orbax: params, optimizer state, step, RNG and the data position
                                 (for a fine-tuning: its final params as a plain run)
    finetune/checkpoints/STEP/   a fine-tuning's own state: base, adapters, head, optimizer, data
    data/                        prepared data (or data.prepared_dir; local or in a bucket):
                                 tokenizer.model, index.json, token shards
    metrics.jsonl, events.*      metrics (JSON lines) and TensorBoard events
    .lock (lock.json in a bucket) the lock of the run writing here (lmjax.lock)
    classifier.npz               a classification fine-tuning's head, labels and pooling
    result.json                  a sweep point's final numbers
  SWEEP/                         a sweep directory: sweep.json, results.jsonl, fit.json, plots/,
                                 and a run directory per point
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Sequence

from etils import epath

from lmjax import config as config_lib
from lmjax.errors import ConfigError, DataError

CONFIG = "config.json"
DATA = "data"
INDEX = "index.json"  # in the prepared data dir: its presence means the data is complete
METRICS = "metrics.jsonl"
CLASSIFIER = "classifier.npz"
RESULT = "result.json"
SWEEP_PLAN = "sweep.json"
SWEEP_RESULTS = "results.jsonl"
FIT = "fit.json"
PLOTS = "plots"
TOKENIZER = "tokenizer.model"  # SentencePiece
HF_TOKENIZER = "tokenizer.json"  # Hugging Face tokenizers
FINETUNE_STATE = "finetune"
WANDB_ID = "wandb_id"  # the W&B run id of a workdir (train.wandb_project), for resuming it


def absolute(path: str) -> str:
  """An absolute local path, or a bucket URL (gs://...) as it is; "" stays ""."""
  return path if not path or "://" in path else os.path.abspath(path)


def join(workdir: str, *names: str) -> epath.Path:
  return epath.Path(workdir).joinpath(*names)


def config_path(workdir: str) -> epath.Path:
  return join(workdir, CONFIG)


def checkpoint_dir(workdir: str, finetune_state: bool = False) -> str:
  """WORKDIR/checkpoints, or the fine-tuning's own state WORKDIR/finetune/checkpoints."""
  parts = (FINETUNE_STATE, "checkpoints") if finetune_state else ("checkpoints",)
  return os.path.join(absolute(workdir), *parts)


def metrics_path(workdir: str) -> epath.Path:
  return join(workdir, METRICS)


def classifier_path(workdir: str) -> epath.Path:
  return join(workdir, CLASSIFIER)


def result_path(workdir: str) -> epath.Path:
  return join(workdir, RESULT)


def sweep_plan_path(sweep_dir: str) -> epath.Path:
  return join(sweep_dir, SWEEP_PLAN)


def sweep_results_path(sweep_dir: str) -> epath.Path:
  return join(sweep_dir, SWEEP_RESULTS)


def fit_path(sweep_dir: str) -> epath.Path:
  return join(sweep_dir, FIT)


def plots_dir(sweep_dir: str) -> str:
  return os.path.join(sweep_dir, PLOTS)


def prepared_dir(cfg, workdir: str) -> str:
  """data.prepared_dir, else WORKDIR/data: shared storage (a bucket, NFS) on a multi-host run."""
  return cfg.data.prepared_dir or os.path.join(str(workdir), DATA)


def is_remote(path) -> bool:
  return "://" in str(path)


def cache_dir() -> str:
  """Where each host keeps its local copies of files in a bucket: $LMJAX_CACHE, else
  ~/.cache/lmjax."""
  return os.path.expanduser(os.environ.get("LMJAX_CACHE") or "~/.cache/lmjax")


def local_copy(path: str, version: str = "") -> str:
  """A local file with the bytes of `path`, for readers that need one (memory maps): `path`
  itself if it is local, else a copy in this host's cache, downloaded once and kept while it has
  the file's size. `version` (e.g. the prepared data's fingerprint) is part of the copy's key, so
  a file that was rewritten under the same name is fetched again."""
  if not is_remote(path):
    return path
  source = epath.Path(path)
  key = hashlib.sha256(f"{path}\0{version}".encode()).hexdigest()[:16]
  local = os.path.join(cache_dir(), "files", key, source.name)
  size = source.stat().length
  if not (os.path.isfile(local) and os.path.getsize(local) == size):
    os.makedirs(os.path.dirname(local), exist_ok=True)
    partial = f"{local}.{os.getpid()}.tmp"
    with source.open("rb") as src, open(partial, "wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 24)
    os.replace(partial, local)  # whole files only, whatever other process reads the cache
  return local


def tokenizer_path(cfg, workdir: str) -> str:
  """data.tokenizer, else the tokenizer prepared for the run (which may not exist yet):
  tokenizer.model, or tokenizer.json for data.tokenizer_type=byte_bpe."""
  if cfg.data.tokenizer:
    return tokenizer_model_file(cfg.data.tokenizer)
  name = HF_TOKENIZER if cfg.data.tokenizer_type == "byte_bpe" else TOKENIZER
  return os.path.join(prepared_dir(cfg, workdir), name)


def tokenizer_model_file(path: str) -> str:
  """A tokenizer's model file: `path`, or the tokenizer.json (else tokenizer.model) in a
  directory `path`; a directory with neither stays as it is."""
  if epath.Path(path).is_dir():
    for name in (HF_TOKENIZER, TOKENIZER):
      if join(path, name).is_file():
        return os.path.join(path, name)
  return path


KIND_COMMANDS = {"pretraining": "lmjax train", "finetune": "lmjax finetune",
                 "sweep": "lmjax sweep"}


def kind(workdir: str) -> str | None:
  """What a workdir holds: "sweep" (sweep.json), "finetune" (a fine-tuning's state or config),
  "pretraining" (a `lmjax train` run or an import, which training continues), or None (new)."""
  if sweep_plan_path(workdir).exists():
    return "sweep"
  if join(workdir, FINETUNE_STATE).exists():
    return "finetune"
  if has_run(workdir):
    return "finetune" if read_json(config_path(workdir)).get("finetune", {}).get("init") else (
        "pretraining")
  return "pretraining" if has_checkpoint(workdir) else None


def has_run(workdir: str) -> bool:
  return config_path(workdir).exists()


def has_checkpoint(workdir: str, finetune_state: bool = False) -> bool:
  """Whether a finished checkpoint exists (a directory named by its step), read without Orbax."""
  directory = epath.Path(checkpoint_dir(workdir, finetune_state))
  return directory.exists() and any(p.name.isdigit() for p in directory.iterdir())


def read_json(path, what: str = "", lines: bool = False):
  """A JSON file (or a JSON-lines file's records), or a DataError naming it if it is damaged."""
  path = epath.Path(path)
  try:
    text = path.read_text()
    if lines:
      return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{path}{f' ({what})' if what else ''} is not valid JSON ({e}): the file is "
                    "damaged. Restore it, or delete it and redo what wrote it.") from None


# --- the saved config ---------------------------------------------------------------------------

def _saved(workdir: str) -> config_lib.ConfigDict:
  return config_lib.from_dict(read_json(config_path(workdir), "the run's config"))


def read_config(workdir: str) -> config_lib.ConfigDict:
  """WORKDIR/config.json as saved, with the keys newer than the run at their defaults."""
  path = config_path(workdir)
  if not path.exists():
    raise ConfigError(f"No run in '{workdir}': {path} is missing. Pass the --workdir of a "
                      "`lmjax train` run.")
  return config_lib.complete(_saved(workdir))


def load_config(workdir: str, overrides: Sequence[str] = ()) -> config_lib.ConfigDict:
  """The config a run was made with, plus `a.b=v` overrides, resolved. How processes find each
  other (distributed.*) belongs to the launch, not to the run: it is never reused."""
  saved = read_config(workdir)
  saved.distributed = config_lib.default_config().distributed
  return config_lib.finalize(config_lib.apply_overrides(saved, overrides))


def write_config(cfg, workdir: str) -> None:
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  config_path(workdir).write_text(config_lib.to_json(cfg))


def check_compatible(cfg, workdir: str, *, every_key: bool = False, hint: str = "") -> None:
  """Refuses, before anything is written, a workdir that holds another run than `cfg` would make:
  another model, objective or fine-tuning (config.identity), or with `every_key` any other
  setting but the launch's (distributed.*). Keys the saved run predates are not compared."""
  if not has_run(workdir):
    return
  saved = _saved(workdir)
  # both sides as config.json holds them (tuples for lists)
  was = config_lib.flat_items(saved)
  now = config_lib.flat_items(config_lib.from_json(config_lib.to_json(cfg)))
  if every_key:
    keys = [k for k in was if not k.startswith("distributed.")]
  else:
    keys = set(config_lib.identity(config_lib.complete(saved))) | set(config_lib.identity(cfg))
  if not was.get("distill.teacher"):  # a run trained alone (pruned, imported) may go on distilled
    keys = [k for k in keys if not k.startswith("distill.")]
  diffs = [f"{k}: {was[k]!r} there, {now.get(k)!r} now" for k in sorted(keys)
           if k in was and was[k] != now.get(k)]
  if diffs:
    raise ConfigError(
        f"'{workdir}' holds another run, made with other settings:\n  " +
        "\n  ".join(diffs[:8]) + ("\n  ..." if len(diffs) > 8 else "") + "\n" +
        (hint or f"Use a new --workdir for this run, or match the config to the saved one "
                 f"({config_path(workdir)}).") + " Nothing was changed.")


def require_new(workdir: str) -> None:
  """Refuses a workdir that already holds a run (an import must not mix with one)."""
  if has_run(workdir) or has_checkpoint(workdir):
    raise ConfigError(f"'{workdir}' already holds an lmjax run; write into a new directory.")

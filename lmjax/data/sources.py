"""Corpus sources: `iter_documents(cfg)` yields documents (str) in a fixed order, so that everything
built from them (tokenizer, shards, the validation split) is reproducible.

  text:GLOB   files, sorted by path, local or in a bucket (text:gs://B/corpus/*.jsonl.gz): .txt (a
              file is a document), .jsonl (a line is a document, its field `data.text_field`), and
              both gzipped (.txt.gz, .jsonl.gz)
  parquet:GLOB  Parquet files, sorted by path (local or in a bucket): a row is a document, its
              column `data.text_field`, read a row group's batch at a time (needs pyarrow)
  arrow:PATH  a Hugging Face dataset saved with `datasets.save_to_disk` (PATH its directory; a
              DatasetDict's split is PATH/SPLIT), or Arrow files (a glob of .arrow files, stream
              or file format), read one record batch at a time from a memory map (needs pyarrow)
  pystdlib    the running Python's standard library .py files, its test suite included and
              site-packages excluded (~30 MB, everywhere Python is; files that are not UTF-8 skipped)
  tfds:NAME   a TFDS dataset already built in `data.tfds_data_dir` (optional extra; never downloads)

Errors are raised when `iter_documents` is called or the bad file is reached, as `DataError`s that
name the path and what to do.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import sysconfig
from typing import Iterable, Iterator

from etils import epath

from lmjax.errors import ConfigError, DataError

TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")
TABLE_KINDS = {"parquet": ".parquet", "arrow": ".arrow"}  # source kind -> file suffix


def iter_documents(cfg) -> Iterator[str]:
  """The documents of `cfg.data.source`, at most `cfg.data.max_bytes` UTF-8 bytes of them (0 = all)."""
  data = cfg.data
  kind, _, arg = data.source.partition(":")
  if data.source == "pystdlib":
    docs = pystdlib_documents()
  elif kind == "text" and arg:
    docs = text_documents(text_files(arg), data.text_field)
  elif kind == "tfds" and arg:
    docs = tfds_documents(arg, data.tfds_data_dir, data.tfds_split, data.text_field)
  elif kind in TABLE_KINDS and arg:
    docs = table_documents(table_files(kind, arg), data.text_field)
  else:
    raise ConfigError(f"data.source='{data.source}' has no documents. Use pystdlib, text:GLOB "
                      f"(.txt/.jsonl[.gz] files), parquet:GLOB, arrow:PATH or tfds:NAME.")
  return cap_bytes(docs, data.max_bytes) if data.max_bytes > 0 else docs


def is_validation_document(doc_index: int, val_fraction: float) -> bool:
  """The held-out split: a hash of the document's position, so it is fixed for a given corpus.

  Document 0 is always held out, so that even a tiny corpus has a validation set.
  """
  digest = hashlib.blake2b(doc_index.to_bytes(8, "little"), digest_size=8).digest()
  return doc_index == 0 or int.from_bytes(digest, "little") < val_fraction * 2**64


def cap_bytes(docs: Iterable[str], max_bytes: int) -> Iterator[str]:
  """Stops after `max_bytes` UTF-8 bytes; the document crossing the cap is cut to fit."""
  remaining = max_bytes
  for doc in docs:
    size = len(doc.encode("utf-8"))
    if size >= remaining:
      yield doc.encode("utf-8")[:remaining].decode("utf-8", errors="ignore")
      return
    remaining -= size
    yield doc


def _bucket_glob(pattern: str, suffixes=TEXT_SUFFIXES) -> list[str]:
  """Files matching a gs://... glob, through etils.epath (one listing per directory level with a
  wildcard; `**` is not supported there)."""
  parts = pattern.split("/")
  first = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
  if "**" in pattern:
    raise DataError(f"data.source='text:{pattern}': `**` is not supported in a bucket (it would "
                    "list every object under it). Use one `*` per directory level.")
  base, rest = "/".join(parts[:first]), "/".join(parts[first:])
  if not rest:
    return [pattern] if epath.Path(pattern).is_file() else []
  return [os.fspath(p) for p in epath.Path(base).glob(rest) if p.name.endswith(suffixes)]


def _glob(kind: str, pattern: str, suffixes: tuple[str, ...]) -> list[str]:
  """The files of a `kind:GLOB` source, sorted, all of a supported kind."""
  if "://" in pattern:
    paths = sorted(_bucket_glob(pattern, suffixes))
  else:
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(p))
  if not paths:
    raise DataError(f"data.source='{kind}:{pattern}' matches no files. Check the path; quote the "
                    f"glob on the command line so the shell does not expand it.")
  unsupported = [p for p in paths if not p.endswith(suffixes)]
  if unsupported:
    raise DataError(f"data.source='{kind}:{pattern}' matches files of an unknown kind, e.g. "
                    f"'{unsupported[0]}'. Supported: {', '.join(suffixes)}; narrow the glob.")
  return paths


def text_files(pattern: str) -> list[str]:
  return _glob("text", pattern, TEXT_SUFFIXES)


def source_files(source: str) -> list[str]:
  """The files a text:, parquet: or arrow: source reads, in order ([] for other sources)."""
  kind, _, arg = source.partition(":")
  if kind == "text" and arg:
    return text_files(arg)
  if kind in TABLE_KINDS and arg:
    return table_files(kind, arg)
  return []


def table_files(kind: str, pattern: str) -> list[str]:
  """parquet: the files of the glob. arrow: a save_to_disk directory's data files in its order
  (state.json), or the .arrow files of a glob."""
  if kind == "arrow" and epath.Path(pattern).is_dir():
    directory = epath.Path(pattern)
    if (directory / "dataset_dict.json").is_file():
      splits = json.loads((directory / "dataset_dict.json").read_text()).get("splits", [])
      raise DataError(f"data.source='arrow:{pattern}' is a DatasetDict with splits {splits}: "
                      f"name one, e.g. arrow:{os.path.join(pattern, (splits or ['train'])[0])}.")
    if not (directory / "state.json").is_file():
      raise DataError(f"data.source='arrow:{pattern}' is a directory without the state.json of "
                      "`datasets.save_to_disk`. Point it at a saved dataset, or at .arrow files "
                      "(arrow:DIR/*.arrow).")
    state = json.loads((directory / "state.json").read_text())
    return [os.fspath(directory / f["filename"]) for f in state.get("_data_files", [])]
  return _glob(kind, pattern, (TABLE_KINDS[kind],))


def _arrow_batches(path: str, columns: list[str]):
  """(schema, iterator of record batches) of a Parquet or Arrow file, read incrementally."""
  try:
    import pyarrow as pa
    import pyarrow.parquet as pq
  except ImportError:
    raise DataError(f"Reading '{path}' needs pyarrow, which is not installed: pip install -e "
                    "\".[data]\" (or pip install pyarrow).") from None
  try:
    if path.endswith(".parquet"):
      f = pq.ParquetFile(epath.Path(path).open("rb") if "://" in path else path)
      schema = f.schema_arrow
      missing = [c for c in columns if c not in schema.names]
      return schema, (iter(()) if missing else f.iter_batches(batch_size=1024,
                                                             columns=columns or None))
    source = pa.PythonFile(epath.Path(path).open("rb")) if "://" in path else pa.memory_map(path)
    try:
      reader = pa.ipc.open_file(source)
      return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:  # not the file format: the stream format (what datasets writes)
      source.seek(0)
      reader = pa.ipc.open_stream(source)
      return reader.schema, iter(reader)
  except (OSError, pa.ArrowException) as e:
    raise DataError(f"Cannot read '{path}' as {'Parquet' if path.endswith('.parquet') else 'Arrow'}"
                    f" ({e}). The file is damaged or of another format: fix or remove it.") from None


def table_records(path: str, columns: list[str] | None = None) -> Iterator[dict]:
  """The rows of a Parquet or Arrow file as dicts (of `columns`, all if None), a batch at a time."""
  import pyarrow as pa
  schema, batches = _arrow_batches(path, columns or [])
  columns = columns or list(schema.names)
  missing = [c for c in columns if c not in schema.names]
  if missing:
    raise DataError(f"'{path}' has no column '{missing[0]}' (it has {list(schema.names)}). Set "
                    f"--config.data.text_field=NAME to the column that holds the text.")
  try:
    for batch in batches:
      yield from batch.select(columns).to_pylist()
  except (OSError, pa.ArrowException) as e:
    raise DataError(f"Cannot read '{path}' ({e}): the file is damaged or truncated. Fix or remove "
                    "it from data.source.") from None


def table_documents(paths: list[str], text_field: str) -> Iterator[str]:
  for path in paths:
    for row, record in enumerate(table_records(path, [text_field])):
      text = record[text_field]
      if text is None:
        continue  # a null: no document
      if not isinstance(text, str):
        raise DataError(f"{path}, row {row}: column '{text_field}' is {type(text).__name__}, not "
                        "a string. Set data.text_field to a text column.")
      yield text


def text_documents(paths: list[str], text_field: str) -> Iterator[str]:
  for path in paths:
    if ".jsonl" in os.path.basename(path):
      yield from jsonl_documents(path, text_field)
    else:
      with _open_text(path) as f:
        yield _read(f, path)


def jsonl_documents(path: str, text_field: str) -> Iterator[str]:
  with _open_text(path) as f:
    for line_number, line in enumerate(_lines(f, path), 1):
      if not line.strip():
        continue
      where = f"{path}:{line_number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where} is not valid JSON ({e}). Each line of a .jsonl file must be "
                        f"one JSON object.") from None
      if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where} has no field '{text_field}' (it has {keys}). Set "
                        f"--config.data.text_field=NAME to the field that holds the text.")
      if not isinstance(record[text_field], str):
        raise DataError(f"{where}: field '{text_field}' is {type(record[text_field]).__name__}, "
                        f"not a string. Set data.text_field to a text field.")
      yield record[text_field]


def _open_text(path: str):
  try:
    if "://" in path:  # a bucket, through etils.epath
      raw = epath.Path(path).open("rb")
      return io.TextIOWrapper(gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw,
                              encoding="utf-8")
    if path.endswith(".gz"):
      return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")
  except OSError as e:
    raise DataError(f"Cannot read '{path}' ({e.strerror or e}). Fix its permissions or remove it "
                    f"from data.source.") from None


def _read(f, path: str) -> str:
  try:
    return f.read()
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise DataError(f"Cannot read '{path}' as UTF-8 text ({e}). Convert it to UTF-8 (or fix the "
                    f"corrupt .gz), or remove it from data.source.") from None


def _lines(f, path: str) -> Iterator[str]:
  try:
    yield from f
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise DataError(f"Cannot read '{path}' as UTF-8 text ({e}). Convert it to UTF-8 (or fix the "
                    f"corrupt .gz), or remove it from data.source.") from None


def pystdlib_files() -> list[str]:
  root = sysconfig.get_paths()["stdlib"]
  paths = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = [d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__")]
    paths.extend(os.path.join(directory, f) for f in files if f.endswith(".py"))
  return sorted(paths)


def pystdlib_documents() -> Iterator[str]:
  for path in pystdlib_files():
    try:
      with open(path, encoding="utf-8") as f:
        yield f.read()
    except (OSError, UnicodeDecodeError):
      continue  # a handful of test modules are deliberately in other encodings


def tfds_documents(name: str, data_dir: str, split: str, text_field: str) -> Iterator[str]:
  try:
    import tensorflow_datasets as tfds  # optional: pip install -e .[tfds]
  except ImportError:
    raise DataError(f"data.source='tfds:{name}' needs tensorflow-datasets, which is not installed: "
                    f"pip install -e .[tfds]") from None
  try:
    dataset = tfds.load(name, split=split, data_dir=data_dir or None, download=False,
                        shuffle_files=False)
  except Exception as e:  # TFDS raises many kinds (DatasetNotFoundError, AssertionError, ...)
    raise DataError(f"TFDS dataset '{name}' (split '{split}') is not in data.tfds_data_dir="
                    f"'{data_dir}' ({type(e).__name__}: {e}). Build it there once, on a machine "
                    f"with network: `tfds build {name} --data_dir=DIR`; lmjax never "
                    f"downloads.") from None
  return _tfds_texts(tfds.as_numpy(dataset), name, text_field)


def _tfds_texts(examples, name: str, text_field: str) -> Iterator[str]:
  for example in examples:
    if text_field not in example:
      raise DataError(f"TFDS dataset '{name}' has no feature '{text_field}' (it has "
                      f"{sorted(example)}). Set --config.data.text_field=NAME.")
    text = example[text_field]
    yield text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)

"""The errors lmjax raises for problems a user can fix, each a type of its own.

Every message is one line (or a short list) that says what is wrong and what to do. `lmjax`
prints such an error's message alone and exits with status 2; any other exception (a JAX error,
a bug) is not one of these and shows its traceback.
"""
from __future__ import annotations


class LmjaxError(Exception):
  """A problem with what the user asked for or gave; the message says what and how to fix it."""


class ConfigError(LmjaxError, ValueError):
  """A config that cannot run: an unknown key, a wrong type or value, keys that contradict each
  other, or a config that does not fit the workdir, devices or tokenizer it meets."""


class UsageError(LmjaxError, ValueError):
  """A command-line flag or function argument out of range (not a config key)."""


class DataError(LmjaxError, ValueError):
  """A corpus, tokenizer, prepared data or fine-tuning file that is missing, unreadable or
  malformed."""


class CheckpointError(LmjaxError):
  """A checkpoint that is missing, cannot be read, or holds another model than the config's."""
  damaged = False  # True: its files cannot be read (restoring falls back to an earlier step)


class ConversionError(LmjaxError, ValueError):
  """A Hugging Face checkpoint lmjax cannot convert, or a run it cannot export."""


class TrainingError(LmjaxError, RuntimeError):
  """The run cannot go on (a diverged loss); the message says what was kept."""

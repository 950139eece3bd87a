"""Using a fine-tuned classifier: `load_classifier("OUT").predict(["some text", ...])`.

A finished `lmjax finetune` with finetune.task=classification leaves in OUT a plain run (the
merged model) and classifier.npz (the head, the label names and the pooling).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import builder
from lmjax import workdir as workdir_lib
from lmjax.data.tasks import encode_classification
from lmjax.data.tokenizer import load_tokenizer
from lmjax.errors import ConfigError
from lmjax.losses import Forward, class_logits


@dataclasses.dataclass
class Classifier:
  cfg: object
  forward: Forward
  params: dict  # {model: merged params, head: {kernel, bias}}
  labels: list[str]
  pooling: str
  tokenizer: object

  def __post_init__(self):
    self._step = jax.jit(lambda p, b: class_logits(self.forward, p, b, self.pooling))

  def logits(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """[len(texts), classes] float32, computed as in training (text + eos, cut to seq_len)."""
    rows = encode_classification(texts, self.tokenizer, self.cfg.data.seq_len)
    rows.pop("truncated")
    out = [np.asarray(self._step(self.params, {k: v[i:i + batch_size] for k, v in rows.items()}))
           for i in range(0, len(texts), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)

  def predict(self, texts: list[str]) -> list[str]:
    return [self.labels[i] for i in self.logits(texts).argmax(-1)]


def load_classifier(workdir: str, step: int | None = None) -> Classifier:
  """The classifier a finished `lmjax finetune` (task=classification) wrote into `workdir`."""
  path = workdir_lib.classifier_path(workdir)
  if not path.exists():
    raise ConfigError(f"No {path}: `lmjax finetune` with finetune.task=classification writes it "
                      "when training finishes.")
  cfg, run, params, _ = builder.load_params(workdir, step)
  with path.open("rb") as f:
    saved = np.load(f)
    head = {"kernel": jnp.asarray(saved["kernel"]), "bias": jnp.asarray(saved["bias"])}
    labels, pooling = [str(x) for x in saved["labels"]], str(saved["pooling"])
  return Classifier(cfg, Forward(run.model), {"model": params, "head": head}, labels, pooling,
                    load_tokenizer(cfg.data.tokenizer))

"""lm-evaluation-harness on an lmjax run: the `lmjax` model (`lmjax eval --tasks=...`).

Requests are scored with the jitted forward (engine.score: exact log-probabilities, batched and
bucketed) and generated with decode.generate (greedy, batched). Tokens are the run's tokenizer's:
a context and continuation are encoded together and split where the context's own encoding ends,
as lm-eval's Hugging Face model does; an empty context starts from bos (or eos where there is
none). Sequences longer than model.max_len keep their last max_len tokens (loglikelihood) or go
in lm-eval's rolling windows (loglikelihood_rolling).

Importing this module registers the model as "lmjax" with lm-eval, so
`lm_eval.simple_evaluate(model="lmjax", model_args="workdir=RUN")` works too.
"""
from __future__ import annotations

import lm_eval.models  # noqa: F401 - lm-eval's own models register first (a lazy registry)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval import utils as lm_utils

from lmjax import builder
from lmjax import data as data_lib
from lmjax import decode
from lmjax import engine as engine_lib
from lmjax import workdir as workdir_lib
from lmjax.errors import ConfigError


@register_model("lmjax")
class LmjaxLM(LM):

  def __init__(self, workdir: str, batch_size: int | str = 16, max_gen_toks: int = 64, **_):
    super().__init__()
    cfg = workdir_lib.load_config(workdir)
    if not cfg.model.causal or cfg.data.source == "synthetic":
      raise ConfigError(f"lm-eval needs a causal LM with a tokenizer; the run in '{workdir}' is "
                        f"{'an encoder' if not cfg.model.causal else 'trained on synthetic tokens'}.")
    self.tokenizer = data_lib.load_tokenizer(workdir_lib.tokenizer_path(cfg, workdir))
    _, run, self.params, _ = builder.load_params(workdir)
    self.model, self.max_len = run.model, cfg.model.max_len
    self.batch = int(batch_size) if str(batch_size).isdigit() else 16
    self.max_gen_toks = int(max_gen_toks)
    t = self.tokenizer
    self.prefix = t.bos_id if t.bos_id >= 0 else max(t.eos_id, 0)

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    args = lm_utils.simple_parse_args_string(arg_string)
    return cls(**args, **{k: v for k, v in (additional_config or {}).items() if v is not None})

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), as lm-eval's HF model splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:  # a context's trailing spaces belong to the continuation
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    encode = lambda s: self.tokenizer.encode([s])[0] if s else []  # noqa: E731
    whole, ctx = encode(context + continuation), encode(context)
    ctx = [self.prefix] + ctx if not ctx else ctx
    if not context:
      whole = ctx + whole
    return whole[:len(ctx)], whole[len(ctx):]

  def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(sum of the continuation's log-probs, whether each continuation token is the argmax)."""
    out = []
    for start in range(0, len(pairs), self.batch):
      chunk = pairs[start:start + self.batch]
      rows = [(ctx + cont)[-self.max_len:] for ctx, cont in chunk]
      scored = engine_lib.score(self.model, self.params, rows)
      for (_, cont), row, s in zip(chunk, rows, scored):
        tail = s[len(row) - len(cont):]
        total = sum(lp for lp, _ in tail)
        greedy = all(lp >= max(top.values()) - 1e-6 for lp, top in tail)
        out.append((total, greedy))
    return out

  def loglikelihood(self, requests, disable_tqdm: bool = False):
    return self._score([self.encode_pair(*r.args) for r in requests])

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    out = []
    for r in requests:
      (text,) = r.args
      windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
          token_list=self.tokenizer.encode([text])[0], prefix_token=self.prefix,
          max_seq_len=self.max_len, context_len=1)]
      out.append(sum(lp for lp, _ in self._score([(list(c), list(t)) for c, t in windows])))
    return out

  def generate_until(self, requests, disable_tqdm: bool = False):
    """Greedy (or the request's temperature) continuations, batched by their settings, cut at
    the first `until` string."""
    out = [None] * len(requests)
    groups: dict = {}
    for i, r in enumerate(requests):
      kwargs = r.args[1]
      key = (int(kwargs.get("max_gen_toks", self.max_gen_toks)),
             float(kwargs.get("temperature", 0.0)))
      groups.setdefault(key, []).append(i)
    for (new, temperature), indices in groups.items():
      if self.model.cfg.style == "gpt2":  # learned positions: prompt + new tokens <= max_len
        new = min(new, self.max_len - 1)
      for start in range(0, len(indices), self.batch):
        chunk = indices[start:start + self.batch]
        prompts = [self.tokenizer.encode_prompt(requests[i].args[0]) for i in chunk]
        if self.model.cfg.style == "gpt2":
          prompts = [p[-(self.max_len - new):] for p in prompts]
        texts = decode.generate_from_ids(self.model, self.params, self.tokenizer, prompts,
                                         max_new_tokens=new, temperature=temperature)
        for i, text in zip(chunk, texts):
          until = requests[i].args[1].get("until") or []
          for stop in [until] if isinstance(until, str) else until:
            text = text.split(stop)[0] if stop else text
          out[i] = text
    return out


def evaluate(workdir: str, tasks: list[str], include_path: str = "", num_fewshot=None,
             limit=None, batch_size: int = 16, log_samples: bool = False) -> dict:
  """lm-eval's simple_evaluate on the run: its results dict (per-task metrics under
  "results")."""
  import lm_eval
  from lm_eval.tasks import TaskManager
  manager = TaskManager(include_path=include_path or None)
  return lm_eval.simple_evaluate(model=LmjaxLM(workdir, batch_size), tasks=tasks,
                                 num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                 log_samples=log_samples)

"""`lmjax serve`'s text per token: the cost of turning a completion's ids into streamed text.

  python benchmarks/detokenize.py TOKENIZER [TOKENIZER ...] [--tokens 256 1024 4096] [--repeats 3]

For each tokenizer (a SentencePiece .model, a tokenizer.json, or a run's workdir) and completion
length L: the ids of L tokens of Python source (the standard library's own files, as the
quickstart's corpus), fed one at a time to `openai_api.Choice.add` with a stop string, as the
server does for every generated token of every row; prints the wall time per completion (median
of --repeats) and the cost of the last 10% of its tokens per token. Run it in two trees (e.g. a
`git worktree` of the commit before) to compare them: the tree is whichever `lmjax` imports.
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import sysconfig
import time


def corpus_ids(tokenizer, tokens: int) -> list[int]:
  ids, files = [], sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
  for f in files:
    ids += tokenizer.encode([open(f, encoding="utf-8", errors="replace").read()])[0]
    if len(ids) >= tokens:
      return ids[:tokens]
  raise SystemExit(f"the standard library has fewer than {tokens} tokens")


def feed(tokenizer, ids, stop):
  from lmjax.openai_api import Choice
  c, times = Choice(tokenizer, stop), []
  for token in ids:
    start = time.perf_counter()
    c.add(token, 0.0, {})
    times.append(time.perf_counter() - start)
  c.rest()
  return sum(times), statistics.mean(times[-max(1, len(times) // 10):])


def main():
  p = argparse.ArgumentParser()
  p.add_argument("tokenizers", nargs="+")
  p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  import lmjax
  from lmjax.data import tokenizer as tokenizer_lib
  print(f"lmjax from {os.path.dirname(lmjax.__file__)}")
  print("| tokenizer | tokens | per completion | per token, last 10% |")
  print("|---|---|---|---|")
  for path in args.tokenizers:
    if os.path.isdir(path) and os.path.isdir(os.path.join(path, "data")):
      path = os.path.join(path, "data")
    tokenizer = tokenizer_lib.load_tokenizer(path)
    for n in args.tokens:
      ids = corpus_ids(tokenizer, n)
      runs = [feed(tokenizer, ids, ["\nclass NeverInTheStdlib"]) for _ in range(args.repeats)]
      total = statistics.median(r[0] for r in runs)
      last = statistics.median(r[1] for r in runs)
      print(f"| {tokenizer.kind} {tokenizer.vocab_size} | {n:,} | {total * 1e3:.1f} ms | "
            f"{last * 1e6:.1f} us |")


if __name__ == "__main__":
  main()

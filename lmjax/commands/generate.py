"""lmjax generate --workdir=DIR --prompt=TEXT [--prompt=TEXT ...] [--chat]: sample continuations
(or, with --chat, replies to each prompt as a user message)."""
from __future__ import annotations

from lmjax.commands import common

HELP = "sample continuations of prompts from a trained run"


def add_arguments(p) -> None:
  p.add_argument("--workdir", required=True, help="the run directory")
  p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
  p.add_argument("--step", type=common.at_least(0),
                 default=None, help="checkpoint step (default: latest)")
  p.add_argument("--max_new_tokens", type=common.at_least(1), default=64)
  p.add_argument("--temperature", type=common.at_least(0.0, float), default=0.0, help="0 = greedy")
  p.add_argument("--top_k", type=common.at_least(0), default=0)
  p.add_argument("--top_p", type=common.at_least(0.0, float), default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--chat", action="store_true",
                 help="each prompt is a user message; reply through the tokenizer's chat template")


def run(args, overrides) -> int:
  from lmjax import distributed
  from lmjax import generate
  from lmjax import workdir as workdir_lib
  distributed.initialize_distributed(workdir_lib.load_config(args.workdir, overrides))
  texts = generate.generate_text(
      args.workdir, args.prompt, step=args.step, overrides=overrides,
      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
      top_p=args.top_p, seed=args.seed, chat=args.chat)
  for prompt, text in zip(args.prompt, texts):
    print(f"=== {prompt!r}\n{text if args.chat else prompt + text}\n")
  return 0

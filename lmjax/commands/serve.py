"""lmjax serve --workdir=RUN [--host --port]: the OpenAI completions and chat API over HTTP."""
from __future__ import annotations

HELP = "serve a run with the OpenAI API (/v1/completions, /v1/chat/completions; `serve` extra)"


def add_arguments(p) -> None:
  p.add_argument("--workdir", required=True, help="the run to serve (float or quantized)")
  p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--chat_template", default="",
                 help="a Jinja chat template file, for a tokenizer without one")
  p.add_argument("--max_batch", type=int, default=16, help="requests decoded together at most")
  p.add_argument("--name", default="", help="the model id clients name (default: the workdir's)")


def run(args, overrides) -> int:
  from lmjax import server
  from lmjax.errors import ConfigError
  if overrides:
    raise ConfigError(f"lmjax serve takes no --config overrides, got {' '.join(overrides)}.")
  try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
  except ImportError:
    raise ConfigError("lmjax serve needs FastAPI and uvicorn: pip install 'lmjax[serve]'") from None
  if args.max_batch < 1 or args.max_batch & (args.max_batch - 1):
    raise ConfigError(f"--max_batch must be a power of two, got {args.max_batch}.")
  print(f"lmjax serve: loading {args.workdir} ...", flush=True)
  server.serve(args.workdir, args.host, args.port, args.chat_template, args.max_batch, args.name)
  return 0

"""`lmjax serve`: a run behind the OpenAI HTTP API (FastAPI + uvicorn, the `serve` extra).

  GET  /health, /v1/models, /tokenizer_info
  POST /v1/completions        prompt: text, token ids, or a list of either; max_tokens,
                              temperature, top_p, stop, seed, n, logprobs (0-5), echo, stream
  POST /v1/chat/completions   messages through the run's chat template (or --chat_template)
  POST /tokenize, /detokenize what lm-eval's `local-completions` uses as a remote tokenizer

Decoding is engine.py's (requests batched together, streamed token by token). A bad request
gets a 4xx JSON error {"error": {"message", "type"}} and the server goes on.
"""

import asyncio
import copy
import dataclasses
import json
import os
import queue
import time
import uuid
from typing import Any

try:  # the `serve` extra; commands/serve.py says how to install it
  from fastapi import FastAPI, Request
  from fastapi.responses import JSONResponse, StreamingResponse
except ImportError:  # pragma: no cover - the module is only imported to serve
  FastAPI = Request = JSONResponse = StreamingResponse = None

from lmjax import builder
from lmjax import data as data_lib
from lmjax import engine as engine_lib
from lmjax import workdir as workdir_lib
from lmjax.data import chat as chat_lib
from lmjax.errors import ConfigError, LmjaxError
from lmjax.metrics import log
from lmjax.openai_api import (CHAT_KEYS, COMPLETION_KEYS, BadRequest, Choice, logprobs_block,
                              piece, sampling, token_prompts, usage)

def load(workdir: str, chat_template: str = "", max_batch: int = 16):
  """(engine, tokenizer, model name) of the run in `workdir`; errors before the server starts."""
  cfg = workdir_lib.load_config(workdir)
  if not cfg.model.causal:
    raise ConfigError(f"The run in '{workdir}' is a bidirectional encoder (model.causal=False): "
                      "it cannot generate; serve a causal LM.")
  if cfg.data.source == "synthetic":
    raise ConfigError(f"The run in '{workdir}' trained on synthetic tokens and has no tokenizer: "
                      "the server takes and returns text. Train on text (data.source=...) or "
                      "convert an HF model with its tokenizer (`lmjax convert --from_hf`).")
  tokenizer = data_lib.load_tokenizer(workdir_lib.tokenizer_path(cfg, workdir))
  if chat_template and not os.path.isfile(chat_template):
    raise ConfigError(f"--chat_template={chat_template} is not a file: give a Jinja chat "
                      "template (as tokenizer_config.json's chat_template holds).")
  if chat_template:  # on a copy: loaded tokenizers are shared (cached)
    tokenizer = copy.copy(tokenizer)
    tokenizer.chat_template = open(chat_template).read()
  _, run, params, _ = builder.load_params(workdir)
  return engine_lib.Engine(run.model, params, tokenizer.eos_id, min(tokenizer.vocab_size,
                           cfg.model.vocab_size), max_batch), tokenizer


def _next(events: queue.Queue, timeout: float = 0.5):
  try:
    return events.get(timeout=timeout)
  except queue.Empty:
    return None


async def _merged(rows, http_request):
  """(row index, event) of every row's engine events as they come; when the client goes away,
  every row is cancelled (the engine frees them at its next step)."""
  live = set(range(len(rows)))
  try:
    while live:
      for i in sorted(live):
        event = await asyncio.to_thread(_next, rows[i].events, 0.05 if len(live) > 1 else 0.5)
        if event is None:
          if await http_request.is_disconnected():
            return
          continue
        yield i, event
        while event[0] not in ("done", "error") and not rows[i].events.empty():
          event = rows[i].events.get_nowait()
          yield i, event
        if event[0] in ("done", "error"):
          live.discard(i)
  finally:
    for r in rows:
      r.cancelled = True


def _error(status: int, message: str, kind: str = "invalid_request_error"):
  return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


async def _body(http_request) -> dict:
  try:
    body = json.loads(await http_request.body())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BadRequest(f"the request body is not valid JSON ({e}).") from None
  if not isinstance(body, dict):
    raise BadRequest("the request body must be a JSON object.")
  return body


def _sse(obj) -> str:
  return f"data: {json.dumps(obj)}\n\n"


@dataclasses.dataclass
class Served:
  engine: Any
  tokenizer: Any
  name: str

  def submit(self, prompts, s) -> list:
    """One engine row per prompt and choice (`n`), seeds seed, seed + 1, ..."""
    return [self.engine.submit(engine_lib.Request(p, s["max_tokens"], s["temperature"],
                                                  s["top_p"], s["seed"] + j))
            for p in prompts for j in range(s["n"])]

  async def complete(self, rows, s, http_request, chunk=None, final=None):
    """Runs the rows: yields `chunk(i, delta, finish)` SSE lines as tokens come (streaming), or
    once `final(choices)` at the end."""
    choices = [Choice(self.tokenizer, s["stop"]) for _ in rows]
    async for i, event in _merged(rows, http_request):
      c = choices[i]
      if event[0] == "error":
        raise RuntimeError(event[1])
      if event[0] == "done":
        c.finish = c.finish or event[1]
        delta = c.rest()
      else:
        delta = c.add(*event[1:])
        if c.finish:  # a stop string: the engine frees the row at its next step
          rows[i].cancelled = True
      if chunk is not None and (delta or c.finish):
        yield chunk(i, delta, c.finish)
    if final is not None:
      yield final(choices)

  async def respond(self, rows, s, body, http_request, chunk, final):
    if body.get("stream"):
      return StreamingResponse(_stream(self.complete(rows, s, http_request, chunk=chunk)),
                               media_type="text/event-stream")
    async for result in self.complete(rows, s, http_request, final=final):
      return result


def make_app(engine, tokenizer, name: str):
  """The FastAPI app serving `engine` (engine.py) with `tokenizer` as model `name`."""
  app = FastAPI(title="lmjax", version="1")
  served = Served(engine, tokenizer, name)

  @app.exception_handler(BadRequest)
  async def bad_request(_, e):
    return _error(400, str(e))

  @app.exception_handler(LmjaxError)
  async def lmjax_error(_, e):
    return _error(400, str(e))

  _info_routes(app, served)

  @app.post("/v1/completions")
  async def _completions(http_request: Request):
    return await completions(served, http_request)

  @app.post("/v1/chat/completions")
  async def _chat_completions(http_request: Request):
    return await chat_completions(served, http_request)

  return app


def _info_routes(app, served: Served) -> None:
  engine, tokenizer, name = served.engine, served.tokenizer, served.name
  max_len = engine.model.cfg.max_len

  @app.get("/health")
  def health():
    return {"status": "ok", "model": name, "batches": engine.batches,
            "largest_batch": engine.largest}

  @app.get("/v1/models")
  def models():
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                        "owned_by": "lmjax", "max_model_len": max_len}]}

  @app.get("/tokenizer_info")
  def tokenizer_info():
    token = lambda i: tokenizer.id_to_token(i) if i >= 0 else None  # noqa: E731
    return {"eos_token": token(tokenizer.eos_id), "bos_token": token(tokenizer.bos_id),
            "pad_token": token(tokenizer.pad_id), "chat_template": tokenizer.chat_template or None,
            "model_max_length": max_len}

  @app.post("/tokenize")
  async def tokenize(http_request: Request):
    body = await _body(http_request)
    if not isinstance(body.get("prompt"), str):
      raise BadRequest("'prompt' must be a string.")
    return {"tokens": tokenizer.encode([body["prompt"]])[0]}

  @app.post("/detokenize")
  async def detokenize(http_request: Request):
    body = await _body(http_request)
    return {"prompt": tokenizer.decode(token_prompts(body.get("tokens"), tokenizer)[0])}


async def completions(served: Served, http_request: Request):
  tokenizer, name = served.tokenizer, served.name
  body = await _body(http_request)
  s = sampling(body, COMPLETION_KEYS, served.engine.model.cfg.max_len)
  prompts = token_prompts(body.get("prompt"), tokenizer)
  k = body.get("logprobs")
  if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 5):
    raise BadRequest("'logprobs' must be an integer in [0, 5] (the alternatives per token).")
  echo, n = bool(body.get("echo")), s["n"]
  scored = served.engine.score(prompts) if echo and k is not None else None
  rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
  rows = served.submit(prompts, s) if s["max_tokens"] else []

  def choice(i, c):
    logprobs = None
    if k is not None:
      entries = [(t, lp, top) for t, (lp, top) in zip(prompts[i // n], scored[i // n])] if \
          scored else []
      logprobs = logprobs_block(tokenizer, entries + c.logprobs, k)
    text = (tokenizer.decode(prompts[i // n]) if echo else "") + c.sent
    return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": c.finish or "length"}

  def final(choices):
    return {"id": rid, "object": "text_completion", "created": created, "model": name,
            "choices": [choice(i, c) for i, c in enumerate(choices)],
            "usage": usage(prompts, n, choices)}

  def chunk(i, delta, finish):
    return _sse({"id": rid, "object": "text_completion", "created": created, "model": name,
                 "choices": [{"index": i, "text": delta, "logprobs": None,
                              "finish_reason": finish}]})

  if not rows:  # max_tokens=0: the prompts (scored with echo + logprobs), nothing generated
    return final([Choice(tokenizer, []) for _ in range(len(prompts) * n)])
  return await served.respond(rows, s, body, http_request, chunk, final)


def _chat_prompt(tokenizer, name, messages) -> list[int]:
  if not isinstance(messages, list) or not messages or not all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and
      isinstance(m.get("content"), str) for m in messages):
    raise BadRequest("'messages' must be a non-empty list of {\"role\", \"content\"} "
                     "objects with string values.")
  if not tokenizer.chat_template:
    raise BadRequest(f"model {name} has no chat template (its tokenizer config has no "
                     "chat_template): use /v1/completions, or restart the server with "
                     "--chat_template=FILE (a Jinja template).")
  return tokenizer.encode([chat_lib.render(tokenizer, messages, add_generation_prompt=True)])[0]


async def chat_completions(served: Served, http_request: Request):
  tokenizer, name = served.tokenizer, served.name
  body = await _body(http_request)
  s = sampling(body, CHAT_KEYS, served.engine.model.cfg.max_len)
  prompts = [_chat_prompt(tokenizer, name, body.get("messages"))]
  rows = served.submit(prompts, s)
  rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
  top_n = int(body.get("top_logprobs") or 0)

  def content_logprobs(c):
    if not body.get("logprobs"):
      return None
    alternatives = lambda top: [{"token": piece(tokenizer, a), "logprob": v} for a, v in  # noqa
                                sorted(top.items(), key=lambda kv: -kv[1])[:top_n]]
    return {"content": [{"token": piece(tokenizer, t), "logprob": lp,
                         "top_logprobs": alternatives(top)} for t, lp, top in c.logprobs]}

  def final(choices):
    return {"id": rid, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.sent},
                         "logprobs": content_logprobs(c), "finish_reason": c.finish or "length"}
                        for i, c in enumerate(choices)],
            "usage": usage(prompts, s["n"], choices)}

  def chunk(i, delta, finish):
    return _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                 "model": name, "choices": [{"index": i, "delta": {"role": "assistant",
                                                                   "content": delta},
                                             "logprobs": None, "finish_reason": finish}]})

  return await served.respond(rows, s, body, http_request, chunk, final)


async def _stream(chunks):
  async for c in chunks:
    yield c
  yield "data: [DONE]\n\n"


def serve(workdir: str, host: str = "127.0.0.1", port: int = 8000, chat_template: str = "",
          max_batch: int = 16, name: str = "") -> None:
  """Loads the run, then serves it until interrupted."""
  import uvicorn
  engine, tokenizer = load(workdir, chat_template, max_batch)
  name = name or workdir_lib.absolute(workdir).rstrip("/").rsplit("/", 1)[-1]
  log(f"lmjax serve: model {name!r} at http://{host}:{port}/v1 (completions, chat/completions, "
      "models; /health); Ctrl-C stops it.")
  uvicorn.run(make_app(engine, tokenizer, name), host=host, port=port, log_level="warning")

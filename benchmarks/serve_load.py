"""`lmjax serve` under load: N concurrent clients against the same requests sent one at a time.

  python benchmarks/serve_load.py RUN [--clients 1 4 16] [--requests 32] [--max_tokens 32]

Starts the server in this process (engine + FastAPI app under uvicorn, as `lmjax serve` does),
warms every batch bucket up (compiles are not timed), then for each N sends `--requests`
completions (greedy, `--max_tokens` new tokens each, prompts from the run's own tokenizer) from N
client threads with the official OpenAI client, and prints requests/s, generated tokens/s,
median and p90 latency, and the speed-up over N=1 (sequential requests).
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time


def main():
  p = argparse.ArgumentParser()
  p.add_argument("run")
  p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
  p.add_argument("--requests", type=int, default=32)
  p.add_argument("--max_tokens", type=int, default=32)
  args = p.parse_args()
  import openai
  import portpicker
  import uvicorn
  from lmjax import server
  engine, tokenizer = server.load(args.run)
  port = portpicker.pick_unused_port()
  srv = uvicorn.Server(uvicorn.Config(server.make_app(engine, tokenizer, "bench"),
                                      host="127.0.0.1", port=port, log_level="warning"))
  threading.Thread(target=srv.run, daemon=True).start()
  while not srv.started:
    time.sleep(0.05)
  client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
  prompts = [f"def f{i}(x):\n    return" for i in range(args.requests)]

  def ask(prompt):
    start = time.perf_counter()
    r = client.completions.create(model="bench", prompt=prompt, max_tokens=args.max_tokens,
                                  temperature=0)
    return time.perf_counter() - start, r.usage.completion_tokens

  def load(n):
    results, lock, it = [], threading.Lock(), iter(prompts)

    def worker():
      while True:
        with lock:
          prompt = next(it, None)
        if prompt is None:
          return
        out = ask(prompt)
        with lock:
          results.append(out)
    threads = [threading.Thread(target=worker) for _ in range(n)]
    start = time.perf_counter()
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    return time.perf_counter() - start, results

  from lmjax import engine as engine_lib
  ids = tokenizer.encode_prompt(prompts[0])
  size = 1
  while size <= engine.max_batch:  # warm-up: every batch size bucket compiles once
    rows = [engine.submit(engine_lib.Request(ids, args.max_tokens)) for _ in range(size)]
    for r in rows:
      while r.events.get()[0] != "done":
        pass
    size *= 2
  for n in sorted({1, *args.clients}):
    load(n)
  print("| clients | requests/s | tokens/s | median latency | p90 latency | vs sequential |")
  print("|---|---|---|---|---|---|")
  base = None
  for n in args.clients:
    wall, results = load(n)
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    base = base or tokens / wall
    print(f"| {n} | {len(results) / wall:.2f} | {tokens / wall:.0f} | "
          f"{statistics.median(latencies):.2f} s | {latencies[int(0.9 * len(latencies))]:.2f} s"
          f" | {tokens / wall / base:.2f}x |")
  print(f"engine: {engine.batches} batches, largest {engine.largest} rows")
  srv.should_exit = True


if __name__ == "__main__":
  main()

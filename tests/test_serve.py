"""Deployment: weight-only quantization, `lmjax serve` with the official OpenAI client, and the
lm-evaluation-harness model, cross-checked against each other and against transformers."""
import json
import math
import threading
import time

import jax
import numpy as np
import pytest

from conftest import ANIMALS, KEYS, VALUES, write_jsonl

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def runs(init_run, tmp_path_factory):
  from lmjax import compress
  root = tmp_path_factory.mktemp("deploy")
  out = {"float": init_run["init"], "root": root}
  for bits in (8, 4):
    out[f"int{bits}"] = str(root / f"int{bits}")
    out[f"sizes{bits}"] = compress.quantize_run(init_run["init"], out[f"int{bits}"], bits,
                                                group=16)
  return out


def start_server(workdir, **kwargs):
  import portpicker
  from lmjax import server
  engine, tokenizer = server.load(workdir, **kwargs)
  app = server.make_app(engine, tokenizer, "tiny")
  port = portpicker.pick_unused_port()
  srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  threading.Thread(target=srv.run, daemon=True).start()
  while not srv.started:
    time.sleep(0.02)
  return srv, engine, tokenizer, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served(runs, tmp_path_factory):
  template = tmp_path_factory.mktemp("chat") / "template.jinja"
  template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}assistant:{% endif %}")
  srv, engine, tokenizer, url = start_server(runs["float"], chat_template=str(template))
  yield {"engine": engine, "tokenizer": tokenizer, "url": url,
         "client": openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)}
  srv.should_exit = True


def val_loss(workdir):
  from lmjax import prune
  return prune.evaluate(workdir)["loss"]


def test_quantized_runs_are_smaller_close_in_loss_and_refuse_training(runs):
  from lmjax import builder, train as train_lib
  from lmjax import workdir as workdir_lib
  from lmjax.errors import ConfigError, ConversionError
  from lmjax.hf import export_hf
  base = val_loss(runs["float"])
  for bits, budget in ((8, 0.005), (4, 0.03)):
    sizes = runs[f"sizes{bits}"]
    assert sizes["kernels"] == 12  # q, k, v, out, up, down in each of the 2 layers
    assert sizes["params_bytes_after"] < sizes["params_bytes_before"]
    loss = val_loss(runs[f"int{bits}"])
    assert base <= loss * (1 + 1e-3) and loss < base * (1 + budget), (bits, base, loss)
  from lmjax import generate
  (text,) = generate.generate_text(runs["int4"], [f"{ANIMALS[0]} {KEYS[0]}"], max_new_tokens=4)
  assert isinstance(text, str)  # generate reads a quantized run as it is
  _, _, params, _ = builder.load_params(runs["int4"])
  kernel = params["layer_0"]["mlp"]["up"]
  assert "kernel" not in kernel and kernel["kernel_q"].dtype == np.int8
  assert kernel["kernel_q"].shape == (16, 64) and kernel["kernel_scale"].shape == (2, 64)
  # a quantized run is read-only: training it says so and writes nothing
  before = sorted(p.name for p in (runs["root"] / "int8").rglob("*"))
  with pytest.raises(ConfigError, match="cannot be trained"):
    train_lib.train(workdir_lib.load_config(runs["int8"]), runs["int8"], progress=False)
  assert sorted(p.name for p in (runs["root"] / "int8").rglob("*")) == before
  with pytest.raises(ConversionError, match="quantized"):
    export_hf(runs["int8"], str(runs["root"] / "hf"))


def test_the_quantize_command(runs, tmp_path, capsys):
  from lmjax import commands
  out = tmp_path / "q"
  assert commands.run(["quantize", f"--workdir={runs['float']}", f"--out={out}", "--bits=4",
                       "--group_size=8"]) == 0
  printed = capsys.readouterr()
  assert "before quantization" in printed.out and "Quantized 12 projection kernels" in printed.out
  from lmjax.errors import ConfigError
  with pytest.raises(ConfigError, match="already holds"):  # an existing run is never overwritten
    commands.run(["quantize", f"--workdir={runs['float']}", f"--out={out}", "--bits=8"])
  with pytest.raises(ConfigError, match="already quantized"):
    commands.run(["quantize", f"--workdir={out}", f"--out={tmp_path / 'again'}", "--bits=8"])


def test_int4_packing_round_trips():
  from lmjax import quantize
  rng = np.random.default_rng(0)
  w = rng.normal(size=(4, 8, 32)).astype(np.float32)  # attention out: [N, H, D], 2 contract
  q, scale = quantize.quantize_kernel(w, 2, "int4", 4)
  assert q.shape == (4, 4, 32) and scale.shape == (4, 2, 32)
  back = np.asarray(quantize.dequantize(q, scale, 2, "int4", np.float32))
  step = np.repeat(scale, 4, axis=1)  # each weight is within half a step of its group's grid
  assert np.all(np.abs(back - w) <= step / 2 + 1e-6)
  assert np.allclose(np.round(back / step), np.clip(np.round(w / step), -7, 7))


def test_openai_client_completions_chat_stream_and_logprobs(served, runs):
  from lmjax import builder, decode
  client, tokenizer, engine = served["client"], served["tokenizer"], served["engine"]
  prompt = f"{ANIMALS[0]} {KEYS[1]}"
  r = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
  _, run, params, _ = builder.load_params(runs["float"])
  (expected,) = decode.generate_from_text(run.model, params, tokenizer, [prompt],
                                          max_new_tokens=6)
  assert r.choices[0].text == expected and r.usage.completion_tokens <= 6
  # streaming gives the same text, chunk by chunk, then a finish reason
  chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=6,
                                          temperature=0, stream=True))
  assert "".join(c.choices[0].text for c in chunks) == expected
  assert chunks[-1].choices[0].finish_reason in ("stop", "length")
  # echo + logprobs: the prompt's log-probabilities, equal to a plain forward's log-softmax
  r = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0,
                                echo=True, logprobs=2)
  lp = r.choices[0].logprobs
  ids = tokenizer.encode_prompt(prompt)
  logits = np.asarray(run.model.apply({"params": params}, np.array([ids], np.int32)))[0]
  logp = jax.nn.log_softmax(logits, -1)
  want = [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]
  assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
  assert np.allclose(lp.token_logprobs[1:len(ids)], want, atol=1e-4)
  assert all(len(top) == 2 for top in lp.top_logprobs[1:])
  assert r.choices[0].text.startswith(tokenizer.decode(ids))
  # chat through the template; n and seeded sampling
  chat = client.chat.completions.create(model="tiny", max_tokens=5, temperature=0,
                                        messages=[{"role": "user", "content": prompt}])
  assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5
  streamed = list(client.chat.completions.create(
      model="tiny", max_tokens=5, temperature=0, stream=True,
      messages=[{"role": "user", "content": prompt}]))
  assert "".join(c.choices[0].delta.content or "" for c in streamed) == \
      chat.choices[0].message.content
  a, b = (client.completions.create(model="tiny", prompt=prompt, max_tokens=8, n=3, seed=7,
                                    temperature=1.0) for _ in range(2))
  assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 3
  # a stop string ends the text before it
  full = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
  word = full.choices[0].text.split()[1]
  cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                  stop=[word])
  assert cut.choices[0].text == full.choices[0].text[:full.choices[0].text.index(word)]
  assert cut.choices[0].finish_reason == "stop"
  assert engine.batches > 0


def test_bad_requests_get_4xx_and_the_server_lives_on(served, runs):
  import httpx
  client, url = served["client"], served["url"]
  for kwargs, match in (({"max_tokens": 1000}, "max_tokens"),
                        ({"extra_body": {"frequency_penality": 1}}, "unknown parameter"),
                        ({"temperature": -1}, "temperature")):
    with pytest.raises(openai.BadRequestError, match=match):
      client.completions.create(model="tiny", prompt="cat", **kwargs)
  with pytest.raises(openai.BadRequestError, match="context"):
    client.completions.create(model="tiny", prompt=[[1] * 30], max_tokens=8)
  r = httpx.post(f"{url}/v1/completions", content=b"{not json")
  assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
  # a client that goes away mid-stream frees its row
  cancelled = served["engine"].cancelled
  with httpx.stream("POST", f"{url}/v1/completions", json={
      "prompt": "cat", "max_tokens": 28, "temperature": 1.0, "stream": True}) as r:
    next(r.iter_lines())
  deadline = time.time() + 20
  while served["engine"].cancelled == cancelled and time.time() < deadline:
    time.sleep(0.05)
  assert served["engine"].cancelled > cancelled
  assert httpx.get(f"{url}/health").json()["status"] == "ok"
  # a model without a chat template: a clear 400
  srv, _, _, plain = start_server(runs["int8"])
  try:
    no_chat = openai.OpenAI(base_url=f"{plain}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="no chat template"):
      no_chat.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert no_chat.completions.create(model="tiny", prompt="cat", max_tokens=3).choices
  finally:
    srv.should_exit = True


def test_concurrent_clients_share_a_batch_and_get_their_own_answers(served):
  client, engine = served["client"], served["engine"]
  prompts = [f"{ANIMALS[i % 8]} {KEYS[i % 5]}" for i in range(8)]
  alone = [client.completions.create(model="tiny", prompt=p, max_tokens=6,
                                     temperature=0).choices[0].text for p in prompts]
  results = [None] * len(prompts)
  largest = engine.largest

  def ask(i):
    results[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=6,
                                           temperature=0).choices[0].text

  threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  assert results == alone
  assert engine.largest > max(largest, 1)  # some of them were decoded in one batch


def test_a_run_without_a_tokenizer_is_refused(tmp_path, tiny):
  from lmjax import server, train as train_lib
  from lmjax.errors import ConfigError
  train_lib.train(tiny("train.steps=2", "train.eval_every=2", "train.checkpoint_every=2"),
                  str(tmp_path / "synthetic"), progress=False)
  with pytest.raises(ConfigError, match="no tokenizer"):
    server.load(str(tmp_path / "synthetic"))


def lm_eval_task(root):
  rows = [{"query": f"{ANIMALS[i % 8]} {KEYS[i % 8]}", "choices": [f" {v}" for v in VALUES[:4]],
           "gold": (i + 3) % 4} for i in range(8)]
  data = write_jsonl(root / "pairs.jsonl", rows)
  (root / "pairs.yaml").write_text(
      "task: lmjax_pairs\ndataset_path: json\n"
      f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
      "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{query}}'\n"
      "doc_to_choice: '{{choices}}'\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n")
  (root / "gen.yaml").write_text(
      "task: lmjax_gen\ndataset_path: json\n"
      f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
      "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{query}}'\n"
      "doc_to_target: '{{choices[gold]}}'\ngeneration_kwargs:\n  until: ['\\n']\n"
      "  max_gen_toks: 4\nmetric_list:\n  - metric: exact_match\n")
  return rows


def test_lm_eval_adapter_matches_the_server_and_transformers(runs, served, tmp_path,
                                                            monkeypatch):
  pytest.importorskip("lm_eval")
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  from lm_eval.api.instance import Instance
  from lmjax import harness
  from lmjax.hf import export_hf
  rows = lm_eval_task(tmp_path)
  out = harness.evaluate(runs["float"], ["lmjax_pairs", "lmjax_gen"], str(tmp_path),
                         batch_size=4)
  assert 0 <= out["results"]["lmjax_pairs"]["acc,none"] <= 1
  assert "exact_match,none" in out["results"]["lmjax_gen"]
  lm = harness.LmjaxLM(runs["float"], batch_size=4)
  requests = [Instance("loglikelihood", {}, (r["query"], r["choices"][r["gold"]]), 0)
              for r in rows[:4]]
  ours = [lp for lp, _ in lm.loglikelihood(requests)]
  assert all(lp < 0 for lp in ours)
  pairs = [lm.encode_pair(*r.args) for r in requests]
  # the server's echo + logprobs on the same tokens
  client = served["client"]
  r = client.completions.create(model="tiny", prompt=[c + t for c, t in pairs], max_tokens=0,
                                echo=True, logprobs=1, temperature=0)
  server_lp = [sum(ch.logprobs.token_logprobs[len(c):]) for ch, (c, _) in zip(r.choices, pairs)]
  assert np.allclose(server_lp, ours, atol=1e-3)
  # transformers on the exported model
  export_hf(runs["float"], str(tmp_path / "hf"))
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
  hf_lp = []
  for ctx, cont in pairs:
    with torch.no_grad():
      logits = model(torch.tensor([ctx + cont])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    hf_lp.append(sum(float(logp[len(ctx) + j - 1, t]) for j, t in enumerate(cont)))
  assert np.allclose(hf_lp, ours, atol=1e-3)
  rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {},
                                               (" ".join([rows[0]["query"]] * 12),), 0)])
  assert rolling[0] < 0 and math.isfinite(rolling[0])


def test_lmjax_eval_tasks_command(runs, tmp_path, monkeypatch, capsys):
  pytest.importorskip("lm_eval")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  from lmjax import commands
  lm_eval_task(tmp_path)
  assert commands.run(["eval", f"--workdir={runs['int8']}", "--tasks=lmjax_pairs",
                       f"--include_path={tmp_path}", "--limit=4"]) == 0
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert 0 <= json.loads(line)["tasks"]["lmjax_pairs"]["acc,none"] <= 1


def test_lm_eval_local_completions_against_the_server_equals_the_adapter(served, runs, tmp_path,
                                                                        monkeypatch):
  """lm-eval's own OpenAI-API model, with the server's remote tokenizer: the same per-example
  log-likelihoods as the in-process adapter."""
  lm_eval = pytest.importorskip("lm_eval")
  pytest.importorskip("tenacity")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  from lm_eval.tasks import TaskManager
  from lmjax import harness
  lm_eval_task(tmp_path)
  manager = TaskManager(include_path=str(tmp_path))
  remote = lm_eval.simple_evaluate(
      model="local-completions", model_args=f"base_url={served['url']}/v1/completions,"
      "tokenizer_backend=remote,num_concurrent=2,max_retries=1,tokenized_requests=True",
      tasks=["lmjax_pairs"], task_manager=manager, limit=4, log_samples=True)
  local = harness.evaluate(runs["float"], ["lmjax_pairs"], str(tmp_path), limit=4,
                           log_samples=True)
  resps = lambda out: [r[0][0] for s in out["samples"]["lmjax_pairs"] for r in s["resps"]]  # noqa
  assert np.allclose(resps(remote), resps(local), atol=1e-3)
  assert remote["results"]["lmjax_pairs"]["acc,none"] == local["results"]["lmjax_pairs"]["acc,none"]

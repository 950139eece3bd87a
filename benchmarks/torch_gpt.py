"""A plain PyTorch training loop of lmjax's GPT-2-style model: the baseline for lmjax's CPU speed.

Same architecture as `lmjax.model.Transformer` with style="gpt2": learned positions, pre-LayerNorm
blocks, tanh-GELU MLP, biases everywhere, tied input/output embeddings, causal attention through
`F.scaled_dot_product_attention`. Same training math as lmjax's train step (`lmjax.step`): mean
next-token cross-entropy, global-norm clipping at 1.0, AdamW (b2 0.95, weight decay 0.1 on matrices and
embeddings, none on norms and biases), warmup + cosine schedule, float32 throughout. Same
parameter count for the same shape (tested in tests/test_bench.py).

  python benchmarks/torch_gpt.py --layers 6 --d_model 384 --heads 6 --vocab 8192 --seq_len 256 \
      --batch 16 --steps 20 --threads 2

Prints one JSON line: tokens/s, median step time and its spread, parameter count.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):

  def __init__(self, d_model: int, heads: int, mlp_dim: int):
    super().__init__()
    self.heads = heads
    self.attn_norm = nn.LayerNorm(d_model)
    self.qkv = nn.Linear(d_model, 3 * d_model)  # lmjax has three projections: same params
    self.out = nn.Linear(d_model, d_model)
    self.mlp_norm = nn.LayerNorm(d_model)
    self.up = nn.Linear(d_model, mlp_dim)
    self.down = nn.Linear(mlp_dim, d_model)

  def forward(self, x_BTD):
    b, t, d = x_BTD.shape
    q, k, v = self.qkv(self.attn_norm(x_BTD)).split(d, dim=-1)
    q, k, v = (y.view(b, t, self.heads, d // self.heads).transpose(1, 2) for y in (q, k, v))
    attended_BNTH = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x_BTD = x_BTD + self.out(attended_BNTH.transpose(1, 2).reshape(b, t, d))
    return x_BTD + self.down(F.gelu(self.up(self.mlp_norm(x_BTD)), approximate="tanh"))


class GPT(nn.Module):

  def __init__(self, layers: int, d_model: int, heads: int, vocab: int, max_len: int,
               mlp_dim: int = 0, init_std: float = 0.02):
    super().__init__()
    self.embed = nn.Embedding(vocab, d_model)
    self.pos_embed = nn.Parameter(torch.zeros(max_len, d_model))
    self.blocks = nn.ModuleList(Block(d_model, heads, mlp_dim or 4 * d_model)
                                for _ in range(layers))
    self.final_norm = nn.LayerNorm(d_model)
    self._init(init_std, layers)

  def _init(self, std: float, layers: int):  # lmjax's init: normal(0.02), scaled residual outputs
    for name, p in self.named_parameters():
      if p.dim() == 1:
        continue  # norms keep (1, 0); biases are zeroed below
      out_proj = name.endswith(("out.weight", "down.weight"))
      nn.init.normal_(p, std=std / math.sqrt(2 * layers) if out_proj else std)
    nn.init.normal_(self.pos_embed, std=std / 2)
    for m in self.modules():
      if isinstance(m, nn.Linear):
        nn.init.zeros_(m.bias)

  def forward(self, tokens_BT):
    x_BTD = self.embed(tokens_BT) + self.pos_embed[:tokens_BT.shape[1]]
    for block in self.blocks:
      x_BTD = block(x_BTD)
    return F.linear(self.final_norm(x_BTD), self.embed.weight)  # tied output projection


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def make_optimizer(model: nn.Module, lr: float = 6e-4, weight_decay: float = 0.1,
                   fused: bool = True) -> torch.optim.Optimizer:
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]  # norm scales and biases
  return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def lr_at(step: int, peak: float = 6e-4, warmup: int = 100, total: int = 1000,
          min_ratio: float = 0.1) -> float:
  if step < warmup:
    return peak * step / warmup
  progress = min((step - warmup) / max(total - warmup, 1), 1.0)
  return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_step(model, optimizer, tokens_BT1, step: int, grad_clip: float = 1.0,
               autocast=contextlib.nullcontext()) -> float:
  """One AdamW step; `autocast` (a `torch.autocast`) covers the forward and the loss only."""
  for group in optimizer.param_groups:
    group["lr"] = lr_at(step)
  with autocast:
    logits_BTV = model(tokens_BT1[:, :-1])
    loss = F.cross_entropy(logits_BTV.flatten(0, 1), tokens_BT1[:, 1:].flatten())
  optimizer.zero_grad(set_to_none=True)
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
  optimizer.step()
  return loss.detach()


def benchmark(layers=6, d_model=384, heads=6, vocab=8192, seq_len=256, batch=16, steps=20,
              warmup=3, threads=2, fused=True, seed=0, compile=False, device="cpu",
              dtype="float32", profile=False) -> dict:
  """Median step time of `steps` timed steps after `warmup` untimed ones, on one fixed batch.

  compile: `torch.compile` the model (the warm-up steps compile it). dtype "bfloat16" runs the
  forward and backward under `torch.autocast` (float32 parameters and AdamW state, as lmjax's
  `model.dtype=bfloat16`). profile: the timed steps run under `torch.profiler` and the time per
  op goes to stderr (profile_table).
  """
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  model = GPT(layers, d_model, heads, vocab, seq_len).to(device)
  optimizer = make_optimizer(model, fused=fused)
  run_model = torch.compile(model) if compile else model
  tokens_BT1 = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
  autocast = torch.autocast(device.split(":")[0], torch.bfloat16, enabled=dtype == "bfloat16")
  for step in range(warmup):
    train_step(run_model, optimizer, tokens_BT1, step, autocast=autocast)
  step_times = []
  prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile \
      else contextlib.nullcontext()
  with prof:
    for step in range(warmup, warmup + steps):
      start = time.perf_counter()
      loss = float(train_step(run_model, optimizer, tokens_BT1, step, autocast=autocast))  # waits
      step_times.append(time.perf_counter() - start)
  if profile:
    print(profile_table(prof, steps), file=sys.stderr)
  step_time = statistics.median(step_times)
  return {"framework": "torch", "torch_version": torch.__version__, "threads": threads,
          "compile": compile, "device": device, "dtype": dtype,
          "fused_adamw": fused, "num_params": count_params(model), "step_time_s": step_time,
          "step_time_min_s": min(step_times), "step_time_max_s": max(step_times),
          "tokens_per_second": batch * seq_len / step_time, "loss": loss, "steps": steps}


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear")


def profile_table(prof, steps: int, top: int = 12) -> str:
  """Self CPU time per op over the profiled steps: the matmuls' share, then the largest ops."""
  ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
  total = sum(e.self_cpu_time_total for e in ops) / 1e6
  dots = sum(e.self_cpu_time_total for e in ops if e.key in MATMULS) / 1e6
  lines = [f"torch: op self time over {steps} step(s): {total:.2f} s",
           f"  {'matmuls (mm/addmm/bmm)':<22} {dots:6.2f} s  {dots / total:6.1%}",
           f"  {'everything else':<22} {total - dots:6.2f} s  {(total - dots) / total:6.1%}",
           "largest ops:"]
  lines += [f"  {e.key:<40} {e.self_cpu_time_total / 1e3:8.1f} ms" for e in ops[:top]]
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layers", type=int, default=6)
  p.add_argument("--d_model", type=int, default=384)
  p.add_argument("--heads", type=int, default=6)
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--no_fused", action="store_true", help="AdamW's for-loop implementation")
  p.add_argument("--compile", action="store_true", help="torch.compile the model")
  p.add_argument("--device", default="cpu", help="cpu or cuda")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--profile", action="store_true", help="time per op to stderr (torch.profiler)")
  a = p.parse_args()
  print(json.dumps(benchmark(a.layers, a.d_model, a.heads, a.vocab, a.seq_len, a.batch, a.steps,
                             a.warmup, a.threads, not a.no_fused, compile=a.compile,
                             device=a.device, dtype=a.dtype, profile=a.profile)))


if __name__ == "__main__":
  main()

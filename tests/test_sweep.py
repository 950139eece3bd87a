"""`lmjax sweep`: budgets to steps, the plan, skipping finished points, resuming an interrupted one,
refusing changed settings, and the cluster launch commands."""
import json
import os
import shlex
import shutil
import subprocess
import textwrap

import pytest
from conftest import ROOT, build, run_cli

from lmjax import sweep
from lmjax import train as train_lib
from lmjax.errors import ConfigError
from lmjax.flops import flops_per_token
from lmjax.model import ModelConfig

MICRO = """
from lmjax.sweep import default_sweep_config

def get_config():
  s = default_sweep_config()
  b = s.base
  b.data.source = "synthetic"
  b.model.vocab_size, b.model.max_len, b.data.seq_len, b.train.batch_size = 64, 32, 16, 8
  b.train.log_every, b.train.eval_every, b.train.eval_batches = 4, 1000, 2
  b.train.checkpoint_every = 4
  b.optim.learning_rate = 1e-2
  s.models = ({"num_layers": 1, "d_model": 16, "num_heads": 2, "mlp_dim": 32},
              {"name": "wide", "num_layers": 1, "d_model": 32, "num_heads": 2, "mlp_dim": 64,
               "optim.learning_rate": 5e-3})
  s.warmup_fraction = 0.25
  s.min_steps = 6
  {extra}
  return s
"""


def write_sweep(tmp_path, extra="s.flops = (8e7, 2.4e8)"):
  path = tmp_path / "micro.py"
  path.write_text(MICRO.replace("{extra}", extra))
  return str(path)


def test_budgets_become_steps_with_the_flop_formula(tmp_path):
  spec = write_sweep(tmp_path, "s.flops = (1e6, 8e7, 2.4e8)")
  s = sweep.load_sweep(spec)
  points, left_out = sweep.make_plan(s, str(tmp_path / "w"))
  assert [p.name for p in points] == ["l1d16_c8e07", "wide_c8e07", "l1d16_c2.4e08", "wide_c2.4e08"]
  assert len(left_out) == 2 and all("< min_steps=6" in x for x in left_out)  # 1e6 FLOPs: 0 steps
  tokens_per_step = 8 * 16
  for p in points:
    fpt = flops_per_token(ModelConfig.from_config(p.cfg), 16)
    assert p.flops_per_token == fpt
    assert p.steps == round(p.budget / (fpt * tokens_per_step)) and p.cfg.train.steps == p.steps
    assert p.tokens == p.steps * tokens_per_step and p.flops == pytest.approx(fpt * p.tokens)
    assert abs(p.flops / p.budget - 1) < 0.5 / p.steps + 1e-9  # rounding to whole steps only
    assert p.cfg.optim.warmup_steps == round(0.25 * p.steps)  # warmup scales with the run
    assert p.cfg.train.batch_size == 8 and p.cfg.data.seq_len == 16  # the base's batch rule
    assert p.cfg.optim.learning_rate == (5e-3 if p.name.startswith("wide") else 1e-2)
    assert p.workdir == os.path.join(str(tmp_path / "w"), p.name)
  run = build(points[1].cfg)  # the counts are the real model's
  assert points[1].params == run.num_params
  assert points[1].params_nonembedding == run.num_params - 64 * 32 - 32 * 32  # token, positions

  tokens = sweep.load_sweep(write_sweep(tmp_path, "s.tokens = (2000.0,)"))
  for p in sweep.make_plan(tokens, str(tmp_path / "t"))[0]:
    assert p.steps == round(2000 / tokens_per_step) and p.name.endswith("_t2e03")


def test_generated_shapes_follow_the_width_depth_rule(tmp_path):
  s = sweep.load_sweep(write_sweep(tmp_path, textwrap.dedent("""
  s.models = ()
  s.target_params = (3e4, 1e5, 3e5)
  s.aspect_ratio, s.head_dim, s.width_multiple = 32.0, 16, 16
  s.tokens = (1e4,)""").replace("\n", "\n  ")))
  points, _ = sweep.make_plan(s, str(tmp_path / "w"))
  depths = []
  for p, target in zip(points, (3e4, 1e5, 3e5)):
    m = p.cfg.model
    assert 0.7 < p.params_nonembedding / target < 1.4, (p.name, p.params_nonembedding)
    assert m.d_model % 16 == 0 and m.head_dim == 16 and m.num_heads == m.d_model // 16
    assert m.mlp_dim == 4 * m.d_model
    depths.append(m.num_layers)
  assert depths == sorted(depths) and depths[-1] > depths[0]  # deeper as well as wider


def test_sweep_runs_skips_finished_and_resumes_interrupted(tmp_path, capsys, monkeypatch):
  spec = write_sweep(tmp_path, "s.flops = (1.6e8,)")
  workdir = str(tmp_path / "sweep")
  s = sweep.load_sweep(spec)
  points, _ = sweep.make_plan(s, workdir)
  assert len(points) == 2
  interrupted = points[1]
  # a preemption in the middle of one point (a checkpoint at step 4, no result)
  out = train_lib.train(interrupted.cfg, interrupted.workdir, progress=False, stop_at_step=4)
  assert out["stopped_by"] and sweep.status(interrupted) == "partial"
  capsys.readouterr()

  # --point: one point only (what a cluster job runs)
  sweep.run(s, spec, workdir, progress=False, only=points[0].name)
  assert [sweep.status(p) for p in points] == ["done", "partial"]
  with open(os.path.join(workdir, "results.jsonl")) as f:
    assert [json.loads(x)["name"] for x in f] == [points[0].name]
  capsys.readouterr()

  result = sweep.run(s, spec, workdir, progress=False)
  printed = capsys.readouterr().out
  assert not result["stopped"]
  assert f"Resuming from step 4 in {interrupted.workdir}" in printed
  assert "[sweep 2/2]" in printed and "(resuming)" in printed and "left" in printed
  with open(os.path.join(workdir, "results.jsonl")) as f:
    lines = [json.loads(x) for x in f]
  assert [r["name"] for r in lines] == [p.name for p in points]
  for r, p in zip(lines, points):
    assert (r["params"], r["params_nonembedding"], r["tokens"], r["steps"]) == (
        p.params, p.params_nonembedding, p.tokens, p.steps)
    assert r["flops"] == pytest.approx(p.flops) and 0 < r["val_loss"] < 5
    assert r["resumed"] == (p is interrupted)
  # the interrupted point went on from step 4: no step before it was trained twice
  with open(os.path.join(interrupted.workdir, "metrics.jsonl")) as f:
    steps = [m["step"] for m in map(json.loads, f) if m["split"] == "train"]
  assert steps == sorted(set(steps)) and steps[-1] == interrupted.steps

  def no_training(*args, **kwargs):
    raise AssertionError("a finished point was trained again")
  monkeypatch.setattr(train_lib, "train", no_training)
  again = sweep.run(s, spec, workdir, progress=False)
  assert "done" in capsys.readouterr().out
  assert again["results"] == lines

  changed = sweep.load_sweep(spec, ["optim.weight_decay=0.0"])
  with pytest.raises(ConfigError, match="(?s)other settings.*optim.weight_decay: 0.1 there, 0.0 now"):
    sweep.run(changed, spec, workdir, progress=False)


def test_each_point_frees_its_state_before_the_next(tmp_path, monkeypatch):
  import jax
  spec = write_sweep(tmp_path, "s.flops = (1.6e8,)")
  live, states, real_train = [], [], train_lib.train

  def train(cfg, workdir, **kwargs):
    live.append(sum(x.nbytes for x in jax.live_arrays()))
    result = real_train(cfg, workdir, **kwargs)
    states.append(sum(x.nbytes for x in jax.tree_util.tree_leaves(result["state"])))
    return result
  monkeypatch.setattr(train_lib, "train", train)
  sweep.run(sweep.load_sweep(spec), spec, str(tmp_path / "sweep"), progress=False)
  assert len(live) == 2 and states[0] > 0
  assert live[1] - live[0] < states[0] / 2, (live, states)  # the first point's state is gone
  assert sum(x.nbytes for x in jax.live_arrays()) - live[0] < states[1] / 2


def test_cli_plan_and_errors(tmp_path):
  spec = write_sweep(tmp_path)
  out = run_cli("sweep", f"--config={spec}", f"--workdir={tmp_path / 'w'}", "--plan")
  assert out.returncode == 0, out.stderr
  assert "l1d16_c8e07" in out.stdout and "4 points" in out.stdout
  assert not (tmp_path / "w").exists()  # planning writes nothing
  out = run_cli("sweep", f"--config={spec}", f"--workdir={tmp_path / 'w'}",
                "--config.data.seq_len=64")  # longer than the base's max_len: every point fails
  assert out.returncode == 2 and "data.seq_len=64 exceeds model.max_len=32" in out.stderr
  assert not (tmp_path / "w").exists()
  with pytest.raises(ConfigError, match="Unknown sweep key 'budgets'"):
    sweep.load_sweep(write_sweep(tmp_path, "s.flops = (8e7,)\n  s.budgets = (1,)"))
  with pytest.raises(ConfigError, match="exactly one of flops"):
    sweep.load_sweep(write_sweep(tmp_path, "s.flops = (8e7,)\n  s.tokens = (1e4,)"))


SCONTROL = '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu001\\ngpu002\\n"\n'


def test_launch_commands_run_points_through_launch_scripts(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  (corpus / "a.txt").write_text("hello world\n" * 100)
  spec = write_sweep(tmp_path, f"s.flops = (8e7,)\n  b.data.source = 'text:{corpus}/*.txt'")
  s = sweep.load_sweep(spec, ["train.seed=3"])
  workdir = str(tmp_path / "sweep")
  lines = sweep.launch_commands(s, spec, workdir, ["train.seed=3"], "slurm")
  # the data is prepared once, by a job the points wait for
  assert lines[0].startswith("prep=$(sbatch --parsable --job-name=lmjax-prepare "
                             "launch/slurm.sbatch sweep ") and lines[0].endswith("--prepare_only)")
  assert len(lines) == 3
  words = shlex.split(lines[1])
  assert words[:4] == ["sbatch", "--dependency=afterok:${prep%%;*}", "--job-name=lmjax-l1d16_c8e07",
                       "launch/slurm.sbatch"]
  assert words[4:] == ["sweep", f"--config={spec}", f"--workdir={workdir}",
                       "--config.train.seed=3", "--point=l1d16_c8e07"]
  # what slurm.sbatch makes of those arguments: `lmjax sweep` on every task
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "scontrol").write_text(SCONTROL)
  (bin_dir / "scontrol").chmod(0o755)
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "DRY_RUN": "1",
         "SLURM_JOB_NODELIST": "gpu[001-002]", "GPUS_PER_NODE": "8"}
  out = subprocess.run([shutil.which("bash"), os.path.join(ROOT, "launch", "slurm.sbatch"),
                        *words[4:]], check=False, capture_output=True, text=True, env=env,
                       timeout=60)
  assert out.returncode == 0, out.stderr
  process0 = shlex.split(out.stdout.splitlines()[1].removeprefix("# process 0: "))
  assert process0[:3] == ["lmjax", "sweep", "--no_progress"]
  assert "--point=l1d16_c8e07" in process0 and "--config.distributed.process_id=0" in process0

  with pytest.raises(ConfigError, match="gs://BUCKET"):
    sweep.launch_commands(s, spec, workdir, [], "tpu")
  (tpu_line,) = sweep.launch_commands(s, spec, "gs://b/sweeps/micro", [], "tpu")
  assert tpu_line == f"launch/tpu.sh sweep --config={spec} --workdir=gs://b/sweeps/micro"
  out = subprocess.run([shutil.which("bash"), os.path.join(ROOT, "launch", "tpu.sh"),
                        *shlex.split(tpu_line)[1:], "--dry-run", "--name=lm", "--zone=z"],
                       check=False, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  remote = shlex.split(shlex.split(out.stdout)[-1].removeprefix("--command="))
  assert remote[remote.index("~/lmjax-venv/bin/lmjax") + 1:][:4] == [
      "sweep", f"--config={spec}", "--workdir=gs://b/sweeps/micro", "--no_progress"]

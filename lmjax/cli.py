"""`lmjax <command>`: parses flags and calls library functions; nothing else lives here.

Every command takes `--config=FILE.py[:VARIANT]` and any number of `--config.a.b=VALUE` overrides
(commands that read a trained run default to WORKDIR/config.json).
"""
from __future__ import annotations

import argparse
import json
import sys

from etils import epath

from lmjax.config import ConfigError


def _add_config_flags(p: argparse.ArgumentParser, workdir_required: bool = True,
                      config_required: bool = True) -> None:
  p.add_argument("--config", required=config_required, metavar="FILE.py[:VARIANT]",
                 help="config file and optional variant, e.g. configs/gpt2.py:124m")
  p.add_argument("--workdir", required=workdir_required, help="run directory")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="lmjax", description="Pretrain, evaluate and sample Transformer language models.",
      epilog="Override any config key with --config.SECTION.KEY=VALUE, e.g. "
             "--config.train.steps=100. `lmjax config --config=FILE` lists every key.")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("train", help="train (or resume) a model in --workdir")
  _add_config_flags(p, config_required=False)  # default: the workdir's config.json (resume)
  p.add_argument("--no_progress", action="store_true", help="no progress bar (log lines only)")

  p = sub.add_parser("eval", help="loss, perplexity and bits/byte (masked LM: masked-token "
                     "accuracy) on the validation split")
  _add_config_flags(p, config_required=False)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--batches", type=int, default=None, help="batches to evaluate "
                 "(default: train.eval_batches)")

  p = sub.add_parser("generate", help="sample continuations of prompts from a trained run")
  _add_config_flags(p, config_required=False)
  p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)

  p = sub.add_parser("prepare", help="corpus -> tokenizer -> token shards (WORKDIR/data)")
  _add_config_flags(p)

  p = sub.add_parser("tokenizer", help="tokenizer tools")
  tsub = p.add_subparsers(dest="tokenizer_command", required=True)
  t = tsub.add_parser("train", help="train a SentencePiece tokenizer on the config's corpus")
  _add_config_flags(t)

  p = sub.add_parser("bench", help="compile time, step time, tokens/s, MFU, memory, loader speed")
  _add_config_flags(p, workdir_required=False)
  p.add_argument("--steps", type=int, default=20, help="timed train steps")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
  p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
  p.add_argument("--no_loader", action="store_true", help="skip the data loader measurement")

  p = sub.add_parser("convert", help="Hugging Face checkpoint <-> lmjax run")
  p.add_argument("--from_hf", default=None, metavar="DIR", help="import this HF directory")
  p.add_argument("--to_hf", default=None, metavar="DIR", help="export --workdir's run here")
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None, help="checkpoint step to export")

  p = sub.add_parser("finetune", help="SFT or classification, full or LoRA, from a trained or "
                     "converted run (--init)")
  _add_config_flags(p, config_required=False)  # default: the workdir's config.json (resume)
  p.add_argument("--init", default=None, metavar="RUN_DIR", help="the run (lmjax train or lmjax "
                 "convert --from_hf workdir) to start from; sets finetune.init")
  p.add_argument("--no_progress", action="store_true", help="no progress bar (log lines only)")

  p = sub.add_parser("sweep", help="scaling sweep: train every (model shape, budget) point of a "
                     "sweep config, or print cluster launch commands for them")
  p.add_argument("--config", required=True, metavar="SWEEP.py", help="sweep config file, e.g. "
                 "configs/sweeps/cpu.py; --config.KEY=VALUE overrides its base training config")
  p.add_argument("--workdir", required=True, help="sweep directory: a run directory per point")
  p.add_argument("--plan", action="store_true", help="print the points (N, D, C, steps, status) "
                 "and exit")
  p.add_argument("--point", default=None, help="train only this point")
  p.add_argument("--launch", choices=("slurm", "tpu"), default=None, help="print the launch/ "
                 "commands that run the unfinished points on a cluster, and exit")
  p.add_argument("--prepare_only", action="store_true", help="prepare the points' shared data "
                 "(tokenizer, shards) and exit")
  p.add_argument("--no_progress", action="store_true", help="no progress bars (log lines only)")

  p = sub.add_parser("fit", help="fit scaling laws to a sweep's results: constants, "
                     "compute-optimal N and D, plots")
  p.add_argument("--workdir", required=True, help="the sweep directory (its results.jsonl)")
  p.add_argument("--params", choices=("nonembedding", "total"), default="nonembedding",
                 help="N: non-embedding parameters (default) or all of them")
  p.add_argument("--bootstrap", type=int, default=200, help="resamples for the intervals (0: none)")
  p.add_argument("--no_plots", action="store_true", help="no PNG plots (no matplotlib needed)")

  p = sub.add_parser("coordcheck", help="muP coordinate check: how much a few steps change each "
                     "layer's activations at several widths, sp against mup")
  p.add_argument("--config", default=None, metavar="FILE.py[:VARIANT]", help="the model to vary "
                 "(its d_model is replaced; default: the default config)")
  p.add_argument("--widths", default="64,128,256,512", help="d_model values, comma-separated")
  p.add_argument("--steps", type=int, default=3, help="optimizer steps before measuring")
  p.add_argument("--plot", default=None, metavar="PATH.png", help="also plot the changes here")

  p = sub.add_parser("config", help="print the resolved config (every key)")
  _add_config_flags(p, workdir_required=False, config_required=False)
  return parser


def _split_overrides(argv):
  rest, overrides = [], []
  for arg in argv:
    if arg.startswith("--config."):
      overrides.append(arg[len("--config."):])
    else:
      rest.append(arg)
  return rest, overrides


def _resolve(args, overrides):
  from lmjax import config as config_lib
  from lmjax import train as train_lib
  if args.config:
    return config_lib.get_config(args.config, overrides)
  if getattr(args, "workdir", None):
    return train_lib.load_config(args.workdir, overrides)
  return config_lib.get_config(None, overrides)


def run(argv) -> int:
  argv, overrides = _split_overrides(argv)
  args = _parser().parse_args(argv)
  if args.command == "convert":  # its workdir has no config yet (import) or its own (export)
    from lmjax import hf
    return hf.main_convert(args.from_hf, args.to_hf, args.workdir, args.step, overrides)
  if args.command == "finetune":  # its config is built around the --init run's model
    from lmjax import finetune
    from lmjax.sharding import initialize_distributed
    cfg = finetune.resolve_config(args.config, args.workdir, args.init, overrides)
    initialize_distributed(cfg)
    result = finetune.finetune(cfg, args.workdir, progress=not args.no_progress)
    if result["exported"] is not None:
      merged = " (adapters merged)" if cfg.finetune.lora_rank else ""
      print(f"Wrote the final params{merged} as step {result['exported']} of a plain run in "
            f"{args.workdir}" + (
                f"; the classifier head is in {args.workdir}/{finetune.CLASSIFIER_FILE}."
                if cfg.finetune.task == "classification" else
                f": `lmjax generate --workdir={args.workdir}` samples from it."))
    return 0
  if args.command == "sweep":  # a sweep config is not a training config
    from lmjax import sweep
    return sweep.main_sweep(args.config, args.workdir, overrides, point=args.point,
                            launch=args.launch, plan=args.plan, prepare_only=args.prepare_only,
                            progress=not args.no_progress)
  if args.command == "fit":
    if overrides:
      raise ConfigError("lmjax fit takes no --config.* overrides: it reads the sweep's results.")
    from lmjax import scaling
    scaling.main_fit(args.workdir, params=args.params, bootstrap_samples=args.bootstrap,
                     plots=not args.no_plots)
    return 0
  if args.command == "train" and not args.config and not (
      epath.Path(args.workdir) / "config.json").exists():
    raise ConfigError("lmjax train needs --config=FILE.py[:VARIANT] (or a --workdir that holds "
                      "a run's config.json, to resume it).")
  cfg = _resolve(args, overrides)  # config errors surface here, before anything is touched
  from lmjax.sharding import initialize_distributed
  initialize_distributed(cfg)  # before any JAX work: multi-host runs join their peers here

  if args.command == "config":
    from lmjax.config import to_json
    print(to_json(cfg))
  elif args.command == "train":
    from lmjax import train as train_lib
    result = train_lib.train(cfg, args.workdir, progress=not args.no_progress)
    if result["stopped_by"] is None and result.get("sample"):
      print(f"\nSample (temperature 0.8, top-p 0.95), prompt {result['sample']['prompt']!r}:\n"
            f"{result['sample']['text']}")
  elif args.command == "eval":
    from lmjax import evaluate as evaluate_lib
    from lmjax import metrics as metrics_lib
    from lmjax import train as train_lib
    cfg, setup, state = train_lib.load_run(args.workdir, args.step, overrides)
    _, eval_step = train_lib.compile_steps(setup, args.workdir)
    result = evaluate_lib.evaluate_split(cfg, args.workdir, setup, eval_step, state.params,
                                         num_batches=args.batches)
    step = int(state.step)
    print(evaluate_lib.format_result(step, result))
    print(json.dumps({"step": step, "split": "val", **result}))
    writer = metrics_lib.MetricsWriter(args.workdir, tensorboard=False)
    writer.write(step, "val", **result)
  elif args.command == "generate":
    from lmjax import decode
    for prompt, text in zip(args.prompt, decode.generate_text(
        args.workdir, args.prompt, step=args.step, overrides=overrides,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed)):
      print(f"=== {prompt!r}\n{prompt}{text}\n")
  elif args.command == "prepare":
    from lmjax import data as data_lib
    index = data_lib.prepare(cfg, args.workdir)
    print(json.dumps({k: v for k, v in index.items() if k != "shards"}, indent=2, default=str))
  elif args.command == "bench":
    from lmjax import bench
    bench.run(cfg, steps=args.steps, warmup=args.warmup, json_path=args.json,
              workdir=args.workdir, loader=not args.no_loader)
  elif args.command == "coordcheck":
    from lmjax import mup
    mup.main_coordcheck(cfg, args.widths, args.steps, args.plot)
  elif args.command == "tokenizer":
    from lmjax import data as data_lib
    print(data_lib.resolve_tokenizer(cfg, args.workdir))
  return 0


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  try:
    code = run(argv)
  except (ConfigError, FileNotFoundError, ValueError) as e:
    print(f"lmjax: error: {e}", file=sys.stderr)
    code = 2
  except KeyboardInterrupt:
    print("lmjax: interrupted", file=sys.stderr)
    code = 130
  sys.exit(code)

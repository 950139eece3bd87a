"""lmjax sweep --config=SWEEP.py --workdir=DIR [--plan | --point=P | --launch=K | --prepare_only]."""
from __future__ import annotations

HELP = ("scaling sweep: train every (model shape, budget) point of a sweep config, or print "
        "cluster launch commands for them")


def add_arguments(p) -> None:
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


def run(args, overrides) -> int:
  from lmjax import distributed
  from lmjax import sweep
  s = sweep.load_sweep(args.config, overrides)
  distributed.initialize_distributed(s.base)  # before any JAX work: the points of a multi-host sweep
  if args.plan:
    points, left_out = sweep.make_plan(s, args.workdir)
    for p in points:
      sweep.check_point_config(p)
    print(sweep.format_plan(points, left_out, {p.name: sweep.status(p) for p in points}))
  elif args.launch:
    lines = sweep.launch_commands(s, args.config, args.workdir, overrides, args.launch)
    print("\n".join(lines) if lines else f"# every point of {args.workdir} is done")
  elif args.prepare_only:
    sweep.prepare_data(s, args.workdir)
  else:
    sweep.run(s, args.config, args.workdir, overrides, progress=not args.no_progress,
              only=args.point)
  return 0

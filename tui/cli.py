"""`sami-mlx tui`: open the terminal UI, optionally with a model, a constitution or a run loaded."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that preload the app."""
    parser.add_argument("--model", default="", help="Hub id or local model directory for runs and chat.")
    parser.add_argument("--constitution", help="Constitution file (.yaml/.json) to edit; created on save if new.")
    parser.add_argument(
        "-c",
        "--config",
        help="YAML run settings, as `sami-mlx train -c` reads them, for the Run screen (the flags above override).",
    )
    parser.add_argument("--run", help="A run directory to open: its metrics, samples and checkpoints.")
    parser.add_argument(
        "--runs-dir", default="runs", help="Folder of runs: new runs go here, ctrl+o lists them (default: runs)."
    )


def run(args: argparse.Namespace) -> int:
    """Run the app until the user quits; returns the exit code."""
    from pathlib import Path

    from sami_mlx.errors import SamiError

    if args.run and not (Path(args.run).expanduser() / "metrics.jsonl").is_file():
        raise SamiError(f"--run {args.run}: no metrics.jsonl there; pass a run directory made by `sami-mlx train`")
    from sami_mlx.config_file import config_from_file
    from tui.app import SamiApp

    config = config_from_file(args.config) if args.config else None
    SamiApp(model=args.model, constitution=args.constitution, run=args.run, runs_dir=args.runs_dir, config=config).run()
    return 0

"""`sami-mlx`: the command line. Each subcommand lives in its own module with
`add_arguments(parser)` and `run(args) -> int`; they are imported only when chosen."""

from __future__ import annotations

import argparse
import importlib
import sys

from sami_mlx import __version__
from sami_mlx.cli.guard import guarded

# name -> (module, help). Modules are imported lazily so `sami-mlx --help` stays fast.
COMMANDS = {
    "train": ("sami_mlx.cli.train", "Align a model to a constitution with SAMI."),
    "demo": ("sami_mlx.cli.demo", "Prove the mechanism offline: SAMI on a synthetic principles world."),
    "tui": ("tui.cli", "Open the terminal UI: edit constitutions, watch runs, chat with checkpoints."),
    "eval": ("sami_mlx.cli.eval", "Win rates of a run's checkpoints against the base model, judged pairwise."),
    "write": ("sami_mlx.cli.write", "Draft a constitution (principles and antitheses) with an instruct model."),
    "chat": ("sami_mlx.cli.chat", "Chat in the terminal with the base model or a checkpoint."),
    "models": ("sami_mlx.cli.models", "List the model presets and the memory each needs."),
    "export": ("sami_mlx.cli.export", "Fuse a run's adapters into the base model, with a model card, to share."),
    "serve": ("sami_mlx.cli.serve", "Serve a run's model over mlx-lm's OpenAI-compatible HTTP API."),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sami-mlx", description="SAMI alignment on MLX.")
    parser.add_argument("--version", action="version", version=f"sami-mlx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return guarded(importlib.import_module(COMMANDS[args.command][0]).run, args)


if __name__ == "__main__":
    sys.exit(main())

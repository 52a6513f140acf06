"""`sami-mlx`: the command line (train, and more subcommands as they land)."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from . import train as train_cmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sami-mlx", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sami-mlx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser = sub.add_parser("train", help="Align a model to a constitution with SAMI.")
    train_cmd.make_parser(train_parser)
    args = parser.parse_args(argv)
    if args.command == "train":
        return train_cmd.guarded(train_cmd.run, args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

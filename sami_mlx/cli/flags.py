"""Flags that several commands share."""

from __future__ import annotations

import argparse


def add_sampling_arguments(
    parser: argparse.ArgumentParser,
    max_tokens: int | None,
    max_tokens_help: str,
    *,
    temperature_help: str = "Sampling temperature (default: 0, greedy).",
    top_p_help: str = "Nucleus sampling threshold (default: 1).",
) -> None:
    """--max-tokens (default `max_tokens`), --temperature (default 0) and --top-p (default 1)."""
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help=max_tokens_help)
    parser.add_argument("--temperature", type=float, default=0.0, help=temperature_help)
    parser.add_argument("--top-p", type=float, default=1.0, help=top_p_help)

"""`sami-mlx write`: draft a constitution (principles and antitheses) with an instruct model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sami_mlx.cli.guard import on_interrupt
from sami_mlx.errors import SamiError

MAX_PRINCIPLES = 12


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The writer's flags."""
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--task", help="What the principles are for, e.g. 'answer questions about gardening'.")
    task.add_argument("--task-file", help="Read the task description from a text file.")
    parser.add_argument("--writer", required=True, help="Instruct model that drafts them (hub id or directory).")
    parser.add_argument("--principles", type=int, default=4, metavar="K", help="How many principles (default: 4).")
    parser.add_argument("--out", required=True, help="Constitution file to write (.json, else YAML).")
    parser.add_argument("--name", help="The constitution's name (default: the output file's stem).")
    parser.add_argument(
        "--retries", type=int, default=3, help="Ask again this many times when the answer cannot be read (default: 3)."
    )
    parser.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature (default: 0.7).")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling threshold (default: 1).")
    parser.add_argument(
        "--max-tokens", type=int, help="Tokens the writer may write (default: 160 + 110 per principle)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed (default: 0).")
    parser.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Wrap the request in the writer's chat template (default: when it has one).",
    )
    parser.add_argument("--force", action="store_true", help="Overwrite --out if it exists.")
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow the model's own Python code to run.")
    parser.add_argument("--verbose", action="store_true", help="Show every answer the writer gave.")


@on_interrupt("nothing written")
def run(args: argparse.Namespace) -> int:
    """Validate the flags, load the writer, draft, save, and print the constitution."""
    from sami_mlx.config import check_sampling
    from sami_mlx.fileio import read_text
    from sami_mlx.inputs.constitution import save_constitution
    from sami_mlx.model import load_model
    from sami_mlx.writer import default_max_tokens, draft_constitution

    task = read_text(args.task_file, "task file") if args.task_file else args.task
    if not task or not task.strip():
        raise SamiError("--task is empty; describe the task the principles are for")
    if not 1 <= args.principles <= MAX_PRINCIPLES:
        raise SamiError(f"--principles {args.principles}: choose between 1 and {MAX_PRINCIPLES}")
    if args.retries < 0:
        raise SamiError(f"--retries {args.retries}: must be 0 or more")
    check_sampling(args.temperature, args.top_p, args.max_tokens)
    out = Path(args.out).expanduser()
    if out.is_dir():
        raise SamiError(f"--out {out}: is a directory; give a file name such as principles.yaml")
    if out.exists() and not args.force:
        raise SamiError(f"--out {out}: already exists; choose another file or pass --force")
    if out.suffix.lower() not in (".json", ".yaml", ".yml"):
        raise SamiError(f"--out {out}: use a .yaml, .yml or .json file name")

    try:
        model, tokenizer, _ = load_model(args.writer, args.trust_remote_code)
    except SamiError as e:
        raise SamiError(str(e).replace("--model", "--writer", 1)) from None

    def report(attempt: int, answer: str, error: str | None) -> None:
        if args.verbose:
            print(f"--- answer {attempt} ---\n{answer.strip()}\n---", file=sys.stderr)
        if error:
            print(f"answer {attempt} could not be read: {error}", file=sys.stderr)

    constitution = draft_constitution(
        model,
        tokenizer,
        task,
        args.principles,
        name=args.name or out.stem,
        retries=args.retries,
        max_tokens=args.max_tokens or default_max_tokens(args.principles),
        temperature=args.temperature,
        top_p=args.top_p,
        chat_template=args.chat_template,
        seed=args.seed,
        on_attempt=report,
    )
    save_constitution(constitution, out)
    for n, p in enumerate(constitution.principles, start=1):
        print(f"{n}. {p.name}\n   + {p.positive}\n   - {p.negative}")
    print(f"wrote {out}; review it, then train with --constitution {out}", file=sys.stderr)
    return 0

"""`sami-mlx chat`: a streaming conversation in the terminal with the base model or a checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sami_mlx.chat import ChatSession, PromptStyle
from sami_mlx.checkpoints import Checkpoint, find_checkpoint
from sami_mlx.cli.flags import add_sampling_arguments
from sami_mlx.config import check_sampling
from sami_mlx.config_file import load_run_config
from sami_mlx.errors import SamiError
from sami_mlx.inputs.constitution import load_constitution
from sami_mlx.inputs.prompts import load_template

PROMPT = ">>> "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The chat flags."""
    parser.add_argument("--model", help="Hub id or model directory (default: the run's model).")
    parser.add_argument("--run", help="Run directory whose checkpoints to chat with.")
    parser.add_argument(
        "--iteration", help="Checkpoint to start with: a number, iter-NN or base (default: the latest)."
    )
    parser.add_argument("--constitution", help="Constitution file to put in the prompt (default: the run's).")
    parser.add_argument(
        "--template",
        help="Prompt template with {constitution} and {query} (default: the run's, "
        "else 'chat' with a chat template and 'dialogue' without).",
    )
    parser.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Use the tokenizer's chat template (default: as the run trained; without "
        "--run, when the tokenizer has one).",
    )
    parser.add_argument("--no-constitution", action="store_true", help="Start with the constitution off.")
    add_sampling_arguments(parser, 256, "Maximum tokens per reply (default: 256).")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed (default: 0).")
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow the model's own Python code to run.")


def make_session(args: argparse.Namespace) -> tuple[ChatSession, Checkpoint]:
    """The session the flags describe and the checkpoint to start with; raises SamiError."""
    cfg = load_run_config(args.run) if args.run else None
    if cfg is None and args.iteration not in (None, "base"):
        raise SamiError("--iteration needs --run RUN: the checkpoints live in a run directory")
    model = args.model or (cfg.model if cfg else None)
    if not model:
        raise SamiError("--model is required without --run: a hub id or a local model directory")
    constitution = None
    if args.constitution:
        constitution = load_constitution(args.constitution)
    elif cfg is not None and cfg.constitution:
        if Path(cfg.constitution).expanduser().exists():
            constitution = load_constitution(cfg.constitution)
        else:
            print(
                f"note: the run's constitution {cfg.constitution} is not found; chatting without one "
                "(pass --constitution FILE)",
                file=sys.stderr,
            )
    check_sampling(args.temperature, args.top_p, args.max_tokens)
    if args.template:
        load_template(args.template)  # fail on a bad file before loading the model
    session = ChatSession(
        model,
        run_dir=args.run,
        constitution=constitution,
        template=args.template,
        chat_template=args.chat_template,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        style=PromptStyle.of_config(cfg) if cfg else PromptStyle(),
        trust_remote_code=args.trust_remote_code or bool(cfg and cfg.trust_remote_code),
        use_constitution=not args.no_constitution,
        dequantize=cfg.dequantize if cfg else "auto",
    )
    checkpoint = find_checkpoint(args.run, args.iteration) if args.run else find_checkpoint(None, "base")
    return session, checkpoint


def chat_loop(session: ChatSession, stdin=None, stdout=None, stderr=None) -> int:
    """Read lines until /quit or end of input; replies stream to stdout, status lines to stderr."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = stdin is sys.stdin and stdin.isatty()

    def say(text: str) -> None:
        print(text, file=stderr, flush=True)

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    say(session.status + "  /help for commands")
    while True:
        try:
            if interactive:
                line = input(PROMPT)
            else:
                line = stdin.readline()
                if not line:
                    break
        except EOFError:
            break
        except KeyboardInterrupt:
            write("\n")
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line, say):
                break
            continue
        session.reply(line, write)
        write("\n")
    return 0


def run(args: argparse.Namespace) -> int:
    """Load the model and chat until the user quits."""
    import mlx.core as mx

    session, checkpoint = make_session(args)
    mx.random.seed(args.seed)
    session.load(checkpoint)
    if session.load_note:
        print(session.load_note, file=sys.stderr)
    return chat_loop(session)

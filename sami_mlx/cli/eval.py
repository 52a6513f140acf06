"""`sami-mlx eval`: win rates of a run's checkpoints against the base model, judged pairwise."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sami_mlx import events as ev
from sami_mlx.cli.flags import add_sampling_arguments
from sami_mlx.cli.guard import on_interrupt
from sami_mlx.errors import SamiError
from sami_mlx.evaluation.judge import DEFAULT_JUDGE_MAX_TOKENS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The eval flags: the run, the held-out queries, generation, and the judge."""
    parser.add_argument("--run", required=True, help="Run directory made by `sami-mlx train`.")
    parser.add_argument(
        "--iterations",
        nargs="+",
        metavar="I",
        help="Checkpoints to judge: iteration numbers, names (iter-02) or 'all' (default: the latest).",
    )
    parser.add_argument(
        "--queries",
        required=True,
        help="Held-out queries: .jsonl with a 'query' field, a text file, or a built-in set.",
    )
    parser.add_argument("--limit", type=int, help="Use only the first N queries.")
    parser.add_argument("--constitution", help="Constitution file (default: the run's, from config.yaml).")
    parser.add_argument("--model", help="The base model, if it moved since training (default: the run's).")
    add_sampling_arguments(parser, None, "Maximum new tokens per response (default: the run's).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for A/B order, variants and sampling (default: 0).")
    parser.add_argument("--batch-size", type=int, help="Sequences decoded together (default: the run's).")
    parser.add_argument(
        "--intrinsic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also report the MI lower bound on the held-out queries, base vs checkpoint "
        "(samples N variants per query; default: on).",
    )
    parser.add_argument(
        "--per-principle",
        action="store_true",
        help="Also judge each principle on its own (one more comparison per principle and query).",
    )
    parser.add_argument("--out", help="Where to write the results (default: RUN/eval).")
    judge = parser.add_argument_group("judge")
    judge.add_argument("--judge", help="Local judge: an mlx-lm model (hub id or directory).")
    judge.add_argument("--judge-url", help="OpenAI-compatible endpoint, e.g. http://localhost:8080/v1.")
    judge.add_argument("--judge-model", help="Model name to ask the endpoint for (with --judge-url).")
    judge.add_argument(
        "--judge-api-key-env",
        metavar="VAR",
        help="Environment variable that holds the endpoint's API key (read, never written).",
    )
    judge.add_argument(
        "--judge-template",
        help="Judge prompt: built-in 'default', 'dialogue' or 'summarization' (the paper's judges, "
        "ending in 'Final Response: A/B'), or a file with {principles}, {query}, {response_a}, "
        "{response_b} (use {{ }} for literal braces) that asks for a final A or B "
        "(default: the run's judge_template setting, else 'default').",
    )
    judge.add_argument(
        "--judge-max-tokens",
        type=int,
        default=DEFAULT_JUDGE_MAX_TOKENS,
        help=f"Tokens the judge may write (default: {DEFAULT_JUDGE_MAX_TOKENS}, room to reason "
        "before the verdict; raise it for reasoning models).",
    )
    judge.add_argument("--judge-concurrency", type=int, default=8, help="Concurrent HTTP requests (default: 8).")
    judge.add_argument("--judge-timeout", type=float, default=60.0, help="Seconds per HTTP request (default: 60).")
    judge.add_argument(
        "--judge-retries",
        type=int,
        default=4,
        help="Retries on timeouts, 429 and 5xx, with exponential backoff (default: 4).",
    )
    judge.add_argument(
        "--judge-chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Local judge: wrap prompts in its chat template (default: when it has one).",
    )


@on_interrupt("no results written")  # results are written only at the end
def run(args: argparse.Namespace) -> int:
    """Resolve the flags, evaluate with progress bars, print the table; returns the exit code."""
    from sami_mlx.cli.progress import ProgressBar
    from sami_mlx.evaluation.evaluate import evaluate
    from sami_mlx.evaluation.judge import load_judge_template
    from sami_mlx.evaluation.judge_backends import make_judge
    from sami_mlx.evaluation.report import markdown_table
    from sami_mlx.evaluation.run_setup import EvalSettings, choose_checkpoints, load_run_setup
    from sami_mlx.inputs.queries import load_queries

    run_dir = Path(args.run).expanduser()
    setup = load_run_setup(run_dir, args.constitution)
    checkpoints = choose_checkpoints(run_dir, args.iterations)
    queries = load_queries(args.queries)
    if args.limit is not None:
        if args.limit < 1:
            raise SamiError(f"--limit {args.limit}: must be at least 1")
        queries = queries[: args.limit]
    check_numbers(args)
    template = load_judge_template(args.judge_template or setup.config.judge_template)
    judge = make_judge(
        args.judge,
        args.judge_url,
        args.judge_model,
        api_key_env=args.judge_api_key_env,
        concurrency=args.judge_concurrency,
        timeout=args.judge_timeout,
        retries=args.judge_retries,
        max_tokens=args.judge_max_tokens,
        chat_template=args.judge_chat_template,
        trust_remote_code=setup.config.trust_remote_code,
    )
    judge.check()
    settings = EvalSettings(
        queries=queries,
        max_tokens=args.max_tokens or setup.config.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size or setup.config.gen_batch_size,
        intrinsic=args.intrinsic,
        per_principle=args.per_principle,
        queries_source=args.queries,
    )
    bar = ProgressBar()

    def show(event: ev.Event) -> None:
        if isinstance(event, ev.RunWarning):
            print(f"warning: {event.message}", file=sys.stderr)
        else:
            bar(event)

    try:
        results = evaluate(
            run_dir, checkpoints, judge, settings, template, args.out, args.constitution, show, model=args.model
        )
    finally:
        judge.close()
    out = Path(args.out).expanduser() if args.out else run_dir / "eval"
    print(markdown_table(results), end="")
    kept = kept_adapters(run_dir)
    if kept:
        print(
            f"{run_dir}/adapters.safetensors (what mlx_lm.load(adapter_path=RUN) loads) holds {kept}", file=sys.stderr
        )
    print(f"results in {out}/ ({', '.join(r['checkpoint'] + '.json' for r in results)}, summary.md)", file=sys.stderr)
    return 0


def check_numbers(args: argparse.Namespace) -> None:
    """Refuse numbers that cannot work, naming the flag."""
    from sami_mlx.config import check_sampling

    for flag, value, lo in (
        ("--max-tokens", args.max_tokens, 1),
        ("--batch-size", args.batch_size, 1),
        ("--judge-max-tokens", args.judge_max_tokens, 1),
        ("--judge-concurrency", args.judge_concurrency, 1),
        ("--judge-retries", args.judge_retries, 0),
    ):
        if value is not None and value < lo:
            raise SamiError(f"{flag} {value}: must be at least {lo}")
    if args.judge_timeout <= 0:
        raise SamiError(f"--judge-timeout {args.judge_timeout}: must be above 0 seconds")
    check_sampling(args.temperature, args.top_p)


def kept_adapters(run_dir: Path) -> str:
    """Which checkpoint RUN/adapters.safetensors holds and why, from state.json ('' if unknown)."""
    from sami_mlx.loop.kept import describe_kept
    from sami_mlx.loop.runstate import RunState

    path = run_dir / "state.json"
    try:
        kept = RunState.load(path).kept if path.is_file() else None
    except SamiError:
        return ""
    return f"{kept['name']}{describe_kept(kept, ' (', ')')}" if kept else ""

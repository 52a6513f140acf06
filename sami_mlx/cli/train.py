"""`python -m sami_mlx.cli.train` / `sami-mlx train`: run SAMI from flags and a YAML config."""

from __future__ import annotations

import argparse

import yaml

from sami_mlx.cli import train_flags
from sami_mlx.cli.guard import guarded, on_interrupt
from sami_mlx.cli.train_flags import build_config
from sami_mlx.config import FIELDS, TrainConfig
from sami_mlx.config_file import config_from_file
from sami_mlx.errors import RunAborted, SamiError
from sami_mlx.tracking import Tracker, check_installed, resumed_report_to


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The training flags (one per TrainConfig field) plus --resume and --rank-timeout."""
    from sami_mlx.loop.distributed import DEFAULT_TIMEOUT

    train_flags.add_arguments(parser)
    parser.add_argument("--resume", metavar="RUN", help="Continue a stopped or killed run from its last step.")
    parser.add_argument(
        "--rank-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="Under mlx.launch: end the run when the other ranks have not answered for this long, plus twice "
        f"the time this rank spent on its own share since they last did (default: {DEFAULT_TIMEOUT:.0f}).",
    )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sami-mlx train", description="Align a model to a constitution with SAMI (LoRA on MLX)."
    )
    add_arguments(parser)
    return parser


@on_interrupt("resume with --resume RUN")  # every step is saved
def run(args: argparse.Namespace) -> int:
    """Resolve the config, then train (or resume) with a progress bar; returns the exit code."""
    from sami_mlx.loop.distributed import DEFAULT_TIMEOUT, Ranks

    timeout = getattr(args, "rank_timeout", DEFAULT_TIMEOUT)
    if timeout <= 0:
        raise SamiError(f"--rank-timeout {timeout}: must be above 0 seconds")
    if args.dry_run and not args.resume:
        cfg = build_config(args)
        check_installed(cfg.report_to)
        return dry_run(cfg)
    # Join the launcher's group first, so that a rank failing later is seen by the others at once.
    ranks = Ranks.world(timeout)
    try:
        return _train(args, ranks)
    except (SamiError, RunAborted) as e:
        if ranks.size > 1 and not str(e).startswith("rank "):
            e.args = (f"rank {ranks.rank}: {e}",)
        raise


def dry_run(cfg: TrainConfig) -> int:
    """Print the resolved configuration, what it will train on and the memory it needs; reads only what is
    on this machine (sami_mlx.plan), so it works offline before anything is downloaded."""
    from sami_mlx.instruct import choose_prompts, resolve_prompts
    from sami_mlx.plan import dry_run_report, plan_inputs, tokenizer_at_hand

    tokenizer = tokenizer_at_hand(cfg.model)
    choice = choose_prompts(cfg.model, cfg.chat_template, cfg.template, tokenizer)
    cfg = resolve_prompts(cfg, tokenizer)  # printed as the run will record it
    plan = plan_inputs(cfg)
    plan.prompts = choice
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    if plan.missing:
        count = "an unknown number of" if plan.query_count is None else f"up to {plan.query_count}"
        queries = f"{count} queries ({cfg.queries}: not downloaded yet)"
    else:
        queries = f"{plan.query_count} queries"
    print(
        f"# {queries}, {len(plan.inputs.constitution.principles)} principles, "
        f"{plan.inputs.num_variants} variants per query"
    )
    print(dry_run_report(cfg, plan, tokenizer=tokenizer))
    return 0


def _train(args: argparse.Namespace, ranks) -> int:
    from sami_mlx.cli.progress import ProgressBar
    from sami_mlx.loop.trainer import Callback, resume, train

    if args.resume:
        given = {k: v for k, v in vars(args).items() if k in FIELDS}
        if args.config:
            given = {**config_from_file(args.config), **given}
        # Where a resumed run reports to may change (say, on a machine without wandb): the flag, else the run's.
        report_to = resumed_report_to(args.resume, given.pop("report_to", None))
    else:
        cfg = build_config(args)
        report_to = cfg.report_to
    # Rank 0 alone reports; the tracker starts its runs at RunStarted, before the bar is drawn.
    tracker = Tracker(report_to) if report_to and ranks.primary else None
    bar = ProgressBar(ranks=ranks.size)
    callbacks: list[Callback] = [tracker, bar] if tracker else [bar]
    try:  # an error message must not land on the progress bar's line
        if args.resume:
            resume(args.resume, callbacks=callbacks, overrides=given, ranks=ranks)
        else:
            train(cfg, callbacks=callbacks, ranks=ranks)
    finally:
        bar.close()
        if tracker:
            tracker.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return guarded(run, args)

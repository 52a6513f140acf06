"""The judged comparisons: one judge prompt per query (and per principle), the checkpoint's side
drawn with the seed, and each reply scored for the checkpoint."""

from __future__ import annotations

import random
from dataclasses import dataclass

from sami_mlx.evaluation.judge import JudgeReply, JudgeTemplate
from sami_mlx.evaluation.run_setup import EvalSettings, ModelOutputs, RunSetup
from sami_mlx.evaluation.verdicts import parse_verdict
from sami_mlx.inputs.constitution import principle_order

MAX_JUDGE_TEXT = 4000


@dataclass
class Outcome:
    """One judged comparison: where the checkpoint's response stood, the verdict, and its score."""

    query_index: int
    checkpoint_position: str  # "A" or "B"
    verdict: str | None  # "A", "B" or None when unparsable
    score: float | None  # 1 checkpoint won, 0 base won, 0.5 unparsable, None for a judge error
    judge_output: str = ""
    error: str | None = None


@dataclass
class JudgeTask:
    checkpoint: str
    principle: str | None  # None: the whole constitution
    query_index: int
    checkpoint_position: str
    prompt: str


def judge_tasks(
    setup: RunSetup, settings: EvalSettings, base: ModelOutputs, checkpoint: ModelOutputs, template: JudgeTemplate
) -> list[JudgeTask]:
    """One prompt per query (and per principle when asked), the checkpoint's side drawn with the seed.

    The constitution's principles appear in an order shuffled for each query (one draw per query, the
    same for every checkpoint), as the reference's judge prompts do, so no principle gains weight
    from always coming first.
    """
    c = setup.constitution
    order_rng = random.Random(f"judge-principles-{settings.seed}")
    orders = [principle_order(len(c.principles), order_rng, setup.config.shuffle_principles) for _ in settings.queries]
    whole = [c.render(c.positive_variant, order) for order in orders]
    scopes: list[tuple[str | None, list[str]]] = [(None, whole)]
    if settings.per_principle:
        scopes += [(p.name, [f"1. {p.positive}"] * len(settings.queries)) for p in c.principles]
    tasks = []
    for principle, principles_texts in scopes:
        rng = random.Random(f"judge-order-{settings.seed}-{checkpoint.checkpoint}-{principle or ''}")
        for q, query in enumerate(settings.queries):
            position = "A" if rng.random() < 0.5 else "B"
            ours, theirs = checkpoint.responses[q].text.strip(), base.responses[q].text.strip()
            a, b = (ours, theirs) if position == "A" else (theirs, ours)
            tasks.append(
                JudgeTask(
                    checkpoint.checkpoint, principle, q, position, template.fill(principles_texts[q], query, a, b)
                )
            )
    return tasks


def outcome(task: JudgeTask, reply: JudgeReply) -> Outcome:
    """Score a reply: 1 if it picked the checkpoint, 0 if the base, 0.5 if unparsable; None on error."""
    text = reply.text[:MAX_JUDGE_TEXT]
    if reply.error:
        return Outcome(task.query_index, task.checkpoint_position, None, None, text, reply.error)
    verdict = parse_verdict(reply.text)
    score = 0.5 if verdict is None else float(verdict == task.checkpoint_position)
    return Outcome(task.query_index, task.checkpoint_position, verdict, score, text)

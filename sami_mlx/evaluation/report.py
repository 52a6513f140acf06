"""What an evaluation writes: each checkpoint's result file, the Markdown summary table, and the
warning when the judge's answers often name no verdict."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from sami_mlx.evaluation.comparisons import Outcome
from sami_mlx.evaluation.judge import Judge, JudgeTemplate
from sami_mlx.evaluation.run_setup import EvalSettings, ModelOutputs, RunSetup
from sami_mlx.evaluation.win_rates import mean, summarize

UNPARSABLE_WARN = 0.10


def unparsable_warning(outcomes: Sequence[Outcome], template: JudgeTemplate, out: Path) -> str | None:
    """One line when more than 10% of the judge's answers named no verdict (each counted as 0.5)."""
    answered = [o for o in outcomes if o.error is None]
    bad = sum(o.verdict is None for o in answered)
    if not answered or bad <= UNPARSABLE_WARN * len(answered):
        return None
    return (
        f"{bad} of {len(answered)} judge answers ({100 * bad / len(answered):.0f}%) named no verdict and "
        f"count as ties (judge prompt: {template.source}); read judge_output in {out}/, then pass "
        "--judge-template with a prompt whose last line asks for 'Final Response: A' or 'B' "
        "(built-in: dialogue, summarization), or raise --judge-max-tokens if answers were cut off"
    )


HEADLINE_KEYS = (
    "checkpoint",
    "win_rate",
    "win_rate_ci",
    "length_controlled_win_rate",
    "length_controlled_ci",
    "length_controlled_left_out",
    "n",
    "unparsable",
    "judge_errors",
    "intrinsic",
    "per_principle",
)


def checkpoint_result(
    setup: RunSetup,
    settings: EvalSettings,
    template: JudgeTemplate,
    judge: Judge,
    base: ModelOutputs,
    mine: ModelOutputs,
    outcomes: list[Outcome],
    overlap: int,
) -> dict:
    """Everything one checkpoint's eval file holds: headline numbers, settings and every comparison."""
    base_len = [len(g.tokens) for g in base.responses]
    mine_len = [len(g.tokens) for g in mine.responses]
    overall = outcomes[: len(settings.queries)]
    result = {
        "checkpoint": mine.checkpoint,
        "run": str(setup.run_dir.resolve()),
        **summarize(overall, mine_len, base_len),
    }
    if settings.per_principle:
        result["per_principle"] = {}
        for k, p in enumerate(setup.constitution.principles, start=1):
            part = outcomes[k * len(settings.queries) : (k + 1) * len(settings.queries)]
            result["per_principle"][p.name] = summarize(part, mine_len, base_len)
    else:
        result["per_principle"] = None
    result["intrinsic"] = {"base": base.intrinsic, "checkpoint": mine.intrinsic} if mine.intrinsic else None
    result["mean_length"] = {"base": mean(base_len), "checkpoint": mean(mine_len)}
    result["judge"] = judge.describe()
    result["settings"] = {
        "queries": settings.queries_source,
        "num_queries": len(settings.queries),
        "training_overlap": overlap,
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "seed": settings.seed,
        "judge_template": template.source,
        "constitution": setup.constitution.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    result["items"] = [
        {
            "query": settings.queries[o.query_index],
            "base": base.responses[o.query_index].text,
            "checkpoint": mine.responses[o.query_index].text,
            "base_tokens": base_len[o.query_index],
            "checkpoint_tokens": mine_len[o.query_index],
            "checkpoint_position": o.checkpoint_position,
            "verdict": o.verdict,
            "score": o.score,
            "judge_output": o.judge_output,
            "error": o.error,
        }
        for o in overall
    ]
    return result


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _mi(intrinsic: dict | None) -> str:
    if not intrinsic:
        return "—"
    b, c = intrinsic["base"]["mi_bound"], intrinsic["checkpoint"]["mi_bound"]
    if b is None or c is None:
        return "—"
    return f"{round(b, 3) + 0.0:+.3f} → {round(c, 3) + 0.0:+.3f}"  # + 0.0 turns -0.000 into +0.000


def _ci(ci: list[float] | None) -> str:
    return "—" if ci is None else f"{_pct(ci[0])}–{_pct(ci[1])}"


def _lc(r: dict) -> str:
    """The length-controlled rate with its interval, e.g. '61.0% (52.3%–69.4%)'."""
    if r["length_controlled_win_rate"] is None:
        return "—"
    return f"{_pct(r['length_controlled_win_rate'])} ({_ci(r.get('length_controlled_ci'))})"


def markdown_table(results: Sequence[dict]) -> str:
    """The headline numbers as a Markdown table (and one per principle when judged per principle)."""
    lines = [
        "| checkpoint | n | win rate | 95% CI | length-controlled (95% CI) | equal length, left out | unparsable "
        "| judge errors | MI bound base → checkpoint (nats) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['checkpoint']} | {r['n']} | {_pct(r['win_rate'])} | {_ci(r['win_rate_ci'])} | "
            f"{_lc(r)} | {r.get('length_controlled_left_out', 0)} | {r['unparsable']} | "
            f"{r['judge_errors']} | {_mi(r['intrinsic'])} |"
        )
    for r in results:
        if r.get("per_principle"):
            lines += [
                "",
                f"Per principle, {r['checkpoint']}:",
                "",
                "| principle | n | win rate | 95% CI | length-controlled (95% CI) | equal length, left out "
                "| unparsable |",
                "|---|---:|---:|---|---:|---:|---:|",
            ]
            for name, p in r["per_principle"].items():
                lines.append(
                    f"| {name} | {p['n']} | {_pct(p['win_rate'])} | {_ci(p['win_rate_ci'])} | "
                    f"{_lc(p)} | {p.get('length_controlled_left_out', 0)} | {p['unparsable']} |"
                )
    return "\n".join(lines) + "\n"

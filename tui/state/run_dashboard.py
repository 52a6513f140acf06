"""The Run screen's dashboard as text: the title, the statistics line, the monitor's reading and the
per-iteration table, each drawn from a RunView."""

from __future__ import annotations

import math

from rich.table import Table
from rich.text import Text

from sami_mlx.rates import format_rate
from tui.state.runlog import PrincipleResult, ReplyPair, RunResult, RunView, eval_command, printable, short_path

STATUS_STYLES = {
    "running": "bold yellow",
    "starting": "bold yellow",
    "resuming": "bold yellow",
    "finished": "bold green",
    "stopped": "bold magenta",
    "failed": "bold red",
    "incomplete": "bold magenta",
    "idle": "dim",
}
# "held-out MI" is the MI bound docs/MONITOR.md names (on held-out queries, at the iteration's end, what
# --keep best ranks by); "train MI" is the bound on the iteration's own training batches.
ITERATION_COLUMNS = (
    "it",
    "held-out MI",
    "drift −c/+c",
    "loss",
    "train MI",
    "row",
    "col",
    "groups",
    "dropped",
    "len",
    "no EOS",
    "dist-2",
)
# SamplesReady's counts of query groups dropped before training, and why.
DROPS = (
    ("dropped_empty", "empty"),
    ("dropped_identical", "identical"),
    ("dropped_banned", "banned"),
    ("dropped_echoed", "echoing the constitution"),
    ("dropped_truncated", "truncated"),
    ("dropped_unfinished", "no sentence end"),
)


def title_text(v: RunView, stopping: bool = False) -> Text:
    """The run's directory and status, or how to start one."""
    title = Text()
    if v.run_dir:
        title.append("Run ", style="bold")
        title.append(short_path(v.run_dir))
        title.append(f"  {'stopping' if stopping else v.status}", style=STATUS_STYLES.get(v.status, "bold"))
        if v.reason:
            title.append(f"  ({v.reason})", style="dim")
    else:
        title.append("No run yet: fill in the settings and press ctrl+r, or open a past run with ctrl+o", style="dim")
    return title


def stats_text(v: RunView) -> Text:
    """The last optimizer step's training numbers (proxies, not the result) and the sampling rate;
    the live run's latest warnings."""
    s = v.last_step
    out = Text()
    if s is None:
        out.append("no optimizer steps yet", style="dim")
    else:
        n = max(v.num_variants, 1)
        out.append(f"last step {s['global_step']}: ", style="dim")
        out.append("loss ", style="dim").append(f"{s['loss']:.4f}")
        out.append("   train MI ≥ ", style="dim").append(f"{s['mi_bound']:.4f}")
        out.append(f" of log {n} = {math.log(n):.3f} nats", style="dim")
        out.append("   row acc ", style="dim").append(f"{s['row_accuracy']:.0%}")
        out.append("   col acc ", style="dim").append(f"{s['column_accuracy']:.0%}")
        out.append("\ntraining ", style="dim").append(format_rate(s["tokens_per_sec"]))
        out.append("   peak memory ", style="dim").append(f"{s['peak_memory_gb']:.2f} GiB")
        if s.get("kl"):
            out.append("   KL ", style="dim").append(f"{s['kl']:.4f}")
        if s.get("anchor_kl"):
            out.append("   KL without constitution ", style="dim").append(f"{s['anchor_kl']:.4f}")
    last_samples = v.per_iteration.get(v.iteration, {})
    if last_samples.get("sampling_tokens_per_sec"):
        out.append("   sampling ", style="dim").append(format_rate(last_samples["sampling_tokens_per_sec"]))
    if drops_text(last_samples):
        out.append("   dropped ", style="dim").append(drops_text(last_samples))
    if v.base_ppl:
        out.append("   base ppl ", style="dim").append(f"{v.base_ppl:.2f}")
    if v.live:  # news while it runs; a finished run lists them as notes in its verdict
        for w in v.warnings[-2:]:
            out.append(f"\n⚠ {w}", style="yellow")
    return out


# ---- the verdict card ---------------------------------------------------------------------------

BAR = 10  # cells per bar in the per-principle chart


def ratio_text(value: float | None, limit: float | None, unit: str = "×") -> Text:
    """A drift ratio coloured by its own limit: green within it, red (and ✗) past it, plain with no limit."""
    if not isinstance(value, (int, float)):
        return Text("–", style="dim")
    text = f"{value:.2f}{unit}"
    if limit is None:
        return Text(text)
    ok = math.isfinite(value) and value <= limit
    return Text(text + ("" if ok else " ✗"), style="green" if ok else "bold red")


def bar(value: float | None, style: str) -> Text:
    """A share (0..1) as a bar of BAR cells and its number."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return Text("–".ljust(BAR + 5), style="dim")
    filled = round(max(0.0, min(1.0, value)) * BAR)
    return Text.assemble(("█" * filled, style), ("░" * (BAR - filled), "dim"), f" {value:.2f}")


def principle_rows(result: RunResult) -> Text:
    """The small before/after chart: each principle's name (the held-out one marked) over its bars, so
    that a narrow card wraps no bar (a line is at most 24 cells)."""
    out = Text()
    for p in result.principles:
        out.append("\n" + p.name + (" (held out)" if p.held_out else ""))
        if result.metric == "adherence":
            out.append("\n  base ", style="dim").append_text(bar(p.before, "blue"))
            out.append("\n  SAMI ", style="dim").append_text(bar(p.after, _better(p)))
        else:
            out.append("\n  win rate ", style="dim").append_text(bar(p.after, _better(p)))
    return out


def _better(p: PrincipleResult) -> str:
    before = 0.5 if p.before is None else p.before  # a win rate is measured against a tie
    return "green" if isinstance(p.after, (int, float)) and p.after > before else "red"


def result_text(v: RunView, result: RunResult | None) -> Text:
    """Before/after adherence and the win rate against the base model, or how to measure them."""
    out = Text()
    if result is None:
        out.append("not measured yet (no demo.json or eval/*.json in the run); ", style="dim")
        out.append("F5", style="bold")
        out.append(" measures it here, as this command does:\n", style="dim")
        out.append(eval_command(v.run_dir, v.kept_name))
        return out
    if result.adherence:
        b, a = result.adherence
        out.append("adherence ", style="dim").append(f"{b:.2f} → ")
        out.append(f"{a:.2f}", style="bold green" if a > b else "bold red")
        out.append("   ")
    if result.win_rate is not None:
        out.append("win rate vs base ", style="dim")
        out.append(f"{result.win_rate:.0%}", style="bold green" if result.win_rate > 0.5 else "bold red")
        if result.win_rate_ci:
            lo, hi = result.win_rate_ci
            out.append(f" (95% CI {lo:.0%}–{hi:.0%})", style="dim")
        out.append("   ")
    if result.mi_bound:
        b, a = result.mi_bound
        out.append("held-out MI bound ", style="dim").append(f"{b:+.3f} → {a:+.3f} nats   ")
    out.append(f"\n{result.checkpoint} against base, n {result.n}, judged by {result.judge}", style="dim")
    out.append(f" ({result.source})", style="dim")
    if result.principles:
        out.append_text(principle_rows(result))
    return out


def kept_text(v: RunView, kept: tuple[str, str]) -> Text:
    """Which adapters RUN/adapters.safetensors holds, and why (state.json; the run's last event)."""
    name, why = kept
    out = Text()
    if name:
        out.append(name, style="bold").append(f": {why}" if why else "")
    elif v.kept:
        out.append(v.kept)
    else:
        out.append("nothing yet: the run keeps adapters when it ends", style="dim")
    return out


def health_text(v: RunView) -> Text:
    """The monitor's last reading, each drift next to its own limit and coloured by it; the held-out
    MI bound per iteration (the one MI number docs/MONITOR.md ranks iterations by)."""
    out = Text()
    m = v.monitor
    plain_limit, prompted_limit = v.drift_limits()
    if m is None or m.get("drift_plain") is None:
        what = f"{v.monitor_queries} held-out queries, no reading yet" if v.monitor_queries else "no monitor reading"
        out.append(what, style="dim")
    else:
        healthy = m.get("healthy", True)
        out.append("healthy" if healthy else "tripped", style="green" if healthy else "bold red")
        out.append(f" at iter {m['iteration']} step {m['step']}", style="dim")
        if m.get("mean_length") is not None:
            out.append("   answers ", style="dim").append(f"{m['mean_length']:.1f} tok")
            out.append(f", {m['limit_rate']:.0%} at the limit, repetition {m['repetition']:.2f}", style="dim")
        out.append("\ndrift without constitution ", style="dim")
        out.append_text(ratio_text(m["drift_plain"], plain_limit))
        out.append(f" (limit {plain_limit:g}×)" if plain_limit else " (guard off)", style="dim")
        out.append("   with constitution ", style="dim").append_text(ratio_text(m["drift_prompted"], prompted_limit))
        out.append(f" (limit {prompted_limit:g}×)" if prompted_limit else " (guard off)", style="dim")
    mis = [(it, r["heldout_mi"]) for it, r in sorted(v.per_iteration.items()) if r.get("heldout_mi") is not None]
    if mis:
        out.append("\nheld-out MI bound ", style="dim")
        if v.base_heldout_mi is not None:
            out.append("base ", style="dim").append(f"{v.base_heldout_mi:+.3f}").append(" → ", style="dim")
        out.append("  ".join(f"it{it} {mi:+.3f}" for it, mi in mis)).append(" nats", style="dim")
    return out


def verdict_rows(v: RunView, result: RunResult | None, kept: tuple[str, str]) -> list[tuple[str, Text]]:
    """The card at the top of a run's dashboard, as (heading, text) rows: did it work (the measured
    result), what it kept and why, how healthy it stayed; a finished run's warnings as notes."""
    rows = [("result", result_text(v, result)), ("kept", kept_text(v, kept)), ("health", health_text(v))]
    if not v.live:
        rows += [("note", Text(w, style="dim")) for w in v.warnings]
    return rows


def verdict_table(rows: list[tuple[str, Text]]) -> Table:
    """The card's rows as a grid: headings on the left, wrapped text indented under its own column."""
    grid = Table.grid(padding=(0, 1), expand=True)
    grid.add_column(style="bold", width=8, no_wrap=True)
    grid.add_column(ratio=1)
    for heading, text in rows:
        grid.add_row(heading, text)
    return grid


def drops_text(row: dict) -> str:
    """The groups an iteration dropped, by reason ("2 identical, 1 truncated"); "" for none."""
    return ", ".join(f"{row[k]} {why}" for k, why in DROPS if isinstance(row.get(k), int) and row[k] > 0)


def _dropped(row: dict) -> str:
    counts = [row[k] for k, _ in DROPS if isinstance(row.get(k), int)]
    return str(sum(counts)) if counts else "–"


def _cell(row: dict, key: str, spec: str) -> str:
    value = row.get(key)
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "–"


def iteration_rows(v: RunView) -> list[tuple[str | Text, ...]]:
    """One row per iteration, in ITERATION_COLUMNS order; "–" where a value is missing. Each drift is
    coloured by its own limit (--max-ppl-ratio without the constitution, --max-prompted-ratio with it)."""
    plain_limit, prompted_limit = v.drift_limits()
    rows: list[tuple[str | Text, ...]] = []
    for it in sorted(v.per_iteration):
        r = v.per_iteration[it]
        rows.append(
            (
                str(it),
                _cell(r, "heldout_mi", "+.3f"),
                Text.assemble(
                    ratio_text(r.get("drift_plain"), plain_limit, ""),
                    "/",
                    ratio_text(r.get("drift_prompted"), prompted_limit, ""),
                ),
                _cell(r, "loss", ".4f"),
                _cell(r, "mi_bound", ".4f"),
                _cell(r, "row_accuracy", ".0%"),
                _cell(r, "column_accuracy", ".0%"),
                _cell(r, "groups", "d"),
                _dropped(r),
                _cell(r, "mean_length", ".1f"),
                _cell(r, "no_eos_rate", ".0%"),
                _cell(r, "distinct_2", ".2f"),
            )
        )
    return rows


def pairs_table(source: str, pairs: list[ReplyPair], limit: int = 30) -> Table:
    """Base and aligned replies side by side, one row per query: what SAMI changed, at a glance."""
    table = Table(
        title=Text(source, style="dim"), expand=True, show_lines=True, box=None, padding=(0, 1), title_justify="left"
    )
    table.add_column("base", ratio=1)
    table.add_column("aligned", ratio=1)
    for pair in pairs[:limit]:
        table.add_row(Text("Q: " + printable(pair.query), style="bold"), "")
        table.add_row(Text(printable(pair.base)), Text(printable(pair.aligned)))
    if len(pairs) > limit:
        table.add_row(Text(f"… and {len(pairs) - limit} more", style="dim"), "")
    return table

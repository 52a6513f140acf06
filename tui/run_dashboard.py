"""The Run screen's dashboard as text: the title, the statistics line, the monitor's reading and the
per-iteration table, each drawn from a RunView."""

from __future__ import annotations

import math

from rich.text import Text

from sami_mlx.rates import format_rate
from tui.runlog import RunView, short_path

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
ITERATION_COLUMNS = (
    "it",
    "loss",
    "MI",
    "row",
    "col",
    "drift×",
    "MI held",
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
    s = v.last_step
    out = Text()
    if s is None:
        out.append("no optimizer steps yet", style="dim")
    else:
        n = max(v.num_variants, 1)
        out.append("loss ", style="dim").append(f"{s['loss']:.4f}")
        out.append("   MI ≥ ", style="dim").append(f"{s['mi_bound']:.4f}")
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
    out.append_text(monitor_text(v))
    for w in v.warnings[-2:]:
        out.append(f"\n⚠ {w}", style="yellow")
    return out


def monitor_text(v: RunView) -> Text:
    """The degeneration monitor's last reading: drift with and without the constitution against
    the limit, the held-out MI bound, and which adapters the run kept."""
    m, out = v.monitor, Text()
    if m is None and not v.kept:
        if v.monitor_queries:
            out.append(f"\nmonitor: {v.monitor_queries} held-out queries, no reading yet", style="dim")
        return out
    out.append("\nmonitor ", style="dim")
    if m is not None and m.get("drift_prompted") is not None:
        style = "green" if m["healthy"] else "bold red"
        out.append(f"drift {m['drift_prompted']:.2f}× / {m['drift_plain']:.2f}×", style=style)
        out.append(" with / without constitution", style="dim")
        limit = m.get("limit")
        out.append(f" (limit {limit:g}×)" if limit else " (guard off)", style="dim")
        out.append(f" at iter {m['iteration']} step {m['step']}", style="dim")
        if m.get("heldout_mi") is not None:
            out.append("   held-out MI ", style="dim").append(f"{m['heldout_mi']:+.3f}")
        if m.get("mean_length") is not None:
            out.append("   answers ", style="dim").append(f"{m['mean_length']:.1f} tok")
            out.append(f", {m['limit_rate']:.0%} at limit, rep {m['repetition']:.2f}", style="dim")
    if v.kept:
        out.append("   kept ", style="dim").append(v.kept, style="bold")
    return out


def drops_text(row: dict) -> str:
    """The groups an iteration dropped, by reason ("2 identical, 1 truncated"); "" for none."""
    return ", ".join(f"{row[k]} {why}" for k, why in DROPS if isinstance(row.get(k), int) and row[k] > 0)


def _dropped(row: dict) -> str:
    counts = [row[k] for k, _ in DROPS if isinstance(row.get(k), int)]
    return str(sum(counts)) if counts else "–"


def _cell(row: dict, key: str, spec: str) -> str:
    value = row.get(key)
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "–"


def iteration_rows(v: RunView) -> list[tuple[str, ...]]:
    """One row per iteration, in ITERATION_COLUMNS order; "–" where a value is missing."""
    rows: list[tuple[str, ...]] = []
    for it in sorted(v.per_iteration):
        r = v.per_iteration[it]
        drift = "–"
        if isinstance(r.get("drift_prompted"), (int, float)):
            drift = f"{r['drift_prompted']:.2f}/{r['drift_plain']:.2f}" + ("" if r.get("healthy", True) else " ✗")
        rows.append(
            (
                str(it),
                _cell(r, "loss", ".4f"),
                _cell(r, "mi_bound", ".4f"),
                _cell(r, "row_accuracy", ".0%"),
                _cell(r, "column_accuracy", ".0%"),
                drift,
                _cell(r, "heldout_mi", "+.3f"),
                _cell(r, "groups", "d"),
                _dropped(r),
                _cell(r, "mean_length", ".1f"),
                _cell(r, "no_eos_rate", ".0%"),
                _cell(r, "distinct_2", ".2f"),
            )
        )
    return rows

"""Measuring a run from the TUI: the `sami-mlx eval` command the Run screen starts (against the base
model, with an LLM judge) and the progress it prints."""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from sami_mlx.config_file import load_run_config
from sami_mlx.errors import SamiError
from tui.state.runlog import short_path

# tqdm's bar as `sami-mlx eval` prints it on stderr: "judging: 40%|████      | 4/10 [00:02<00:03, ...]"
BAR = re.compile(r"(?P<stage>[^\r\n|]+?):\s+\d+%\|[^|]*\|\s*(?P<done>\d+)/(?P<total>\d+)")


@dataclass(frozen=True)
class EvalRequest:
    """What one measurement needs: the run, its checkpoint, held-out queries and a judge model."""

    run_dir: str
    checkpoint: str  # iter-NN; "" for the newest
    queries: str
    judge: str
    limit: int | None = None

    def check(self) -> None:
        """Refuse a request `sami-mlx eval` would refuse late, naming the field."""
        if not self.queries:
            raise SamiError("queries: name held-out queries (a .jsonl or text file, or a built-in set)")
        if not self.judge:
            raise SamiError("judge: name a judge model (hub id or directory; the run's base model judges too)")
        if self.limit is not None and self.limit < 1:
            raise SamiError(f"limit {self.limit}: must be at least 1 (or empty for every query)")

    def args(self) -> list[str]:
        """The `sami-mlx eval` arguments (after the command name)."""
        out = ["--run", self.run_dir]
        if self.checkpoint.startswith("iter-"):
            out += ["--iterations", self.checkpoint]
        out += ["--queries", self.queries, "--judge", self.judge]
        if self.limit:
            out += ["--limit", str(self.limit)]
        return out

    def argv(self) -> list[str]:
        """The process to start: this Python's `sami-mlx eval`, so the installed engine measures."""
        return [sys.executable, "-m", "sami_mlx.cli.main", "eval", *self.args()]

    def command(self) -> str:
        """The same command as a user types it."""
        return shlex.join(["sami-mlx", "eval", *[short_path(a) if Path(a).is_absolute() else a for a in self.args()]])


def default_request(run_dir: str | Path, checkpoint: str) -> EvalRequest:
    """A first guess a user edits: the run's own queries (eval warns they are not held out) judged by the run's
    base model, on 16 queries; empty fields where the run's config cannot be read."""
    try:
        cfg = load_run_config(run_dir, flag="")
    except SamiError:
        return EvalRequest(str(run_dir), checkpoint, "", "", 16)
    return EvalRequest(str(run_dir), checkpoint, cfg.queries, cfg.model, 16)


def last_progress(text: str) -> tuple[str, int, int] | None:
    """The last (stage, done, total) in what the command printed so far, or None before its first bar."""
    found = list(BAR.finditer(text))
    if not found:
        return None
    m = found[-1]
    return m["stage"].strip(), int(m["done"]), int(m["total"])


def failure_line(text: str) -> str:
    """The line that says why the command failed (its 'error: ...'), else its last line."""
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip() and not BAR.search(line)]
    errors = [line for line in lines if line.lower().startswith("error")]
    return (errors or lines or ["sami-mlx eval failed without a message"])[-1]

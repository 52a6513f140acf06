"""What the Run screen shows, folded from events: the same code reads a live run and metrics.jsonl."""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from sami_mlx.config import TrainConfig
from sami_mlx.errors import SamiError
from sami_mlx.fileio import read_jsonl
from sami_mlx.loop.runstate import RunState
from sami_mlx.loop.sampling import PARTIAL


@dataclass
class RunView:
    """Progress and metrics of one run, built by `apply`ing its events (as dicts) in order."""

    run_dir: str = ""
    config: dict = field(default_factory=dict)
    iterations: int = 0
    total_steps: int = 0
    num_variants: int = 0
    base_ppl: float | None = None
    iteration: int = 0  # the iteration in progress, 1-based (0 before the first)
    iteration_steps: int = 0
    step: int = 0  # optimizer steps done in the current iteration
    global_step: int = 0
    sampling: tuple[int, int] | None = None  # (done, total) while sampling
    steps: dict[int, dict] = field(default_factory=dict)  # global step -> StepCompleted
    per_iteration: dict[int, dict] = field(default_factory=dict)  # SamplesReady + IterationCompleted
    examples: dict[int, list[dict]] = field(default_factory=dict)  # iteration -> sample groups (live: all so far)
    warnings: list[str] = field(default_factory=list)
    status: str = "idle"  # idle, running, finished, stopped, failed, incomplete
    reason: str = ""
    monitor: dict | None = None  # the degeneration monitor's last reading (MonitorChecked)
    monitor_queries: int = 0
    base_heldout_mi: float | None = None  # the base model's held-out MI bound, measured at the start
    kept: str = ""  # which adapters RUN/adapters.safetensors holds at the end, and why
    kept_name: str = ""  # the same adapters' checkpoint name alone ("iter-02", "iter-03 step 8", "base")

    def apply(self, event: dict) -> None:
        """Fold one event (an `Event.to_dict()` or a metrics.jsonl row) into the view."""
        handler = getattr(self, "_on_" + str(event.get("event", "")), None)
        if handler is not None:
            handler(event)

    def _on_RunStarted(self, e: dict) -> None:
        self.run_dir, self.config = e["run_dir"], e.get("config", {})
        self.iterations, self.total_steps = e["iterations"], e["total_steps"]
        self.num_variants, self.base_ppl = e["num_variants"], e.get("base_ppl")
        self.global_step = e.get("resumed_at_step", 0)
        self.monitor_queries = e.get("monitor_queries", 0)
        self.base_heldout_mi = e.get("base_heldout_mi")
        self.status, self.reason = "running", ""

    def _on_MonitorChecked(self, e: dict) -> None:
        self.monitor = e

    def _on_IterationStarted(self, e: dict) -> None:
        self.iteration, self.iteration_steps, self.step = e["iteration"], e["steps"], 0
        self.sampling = (0, e["queries"] * max(self.num_variants, 1))
        self.examples.pop(e["iteration"], None)  # a resumed sampling reports its groups again

    def _on_GroupSampled(self, e: dict) -> None:
        """A group finished during sampling: the samples panel shows it before the iteration's file exists."""
        self.examples.setdefault(e["iteration"], []).append(
            {"query": e["query"], "variants": e["variants"], "responses": e["responses"]}
        )

    def _on_SamplingProgress(self, e: dict) -> None:
        self.iteration = e["iteration"]
        self.sampling = (e["done"], e["total"])

    def _on_SamplesReady(self, e: dict) -> None:
        self.sampling = None
        row = self.per_iteration.setdefault(e["iteration"], {})
        for key in (
            "groups",
            "mean_length",
            "no_eos_rate",
            "distinct_2",
            "dropped_empty",
            "dropped_identical",
            "dropped_banned",
            "dropped_echoed",
            "dropped_truncated",
            "dropped_unfinished",
        ):
            row[key] = e.get(key)
        row["sampling_tokens_per_sec"] = e.get("tokens_per_sec")
        self.examples[e["iteration"]] = list(e.get("examples", []))

    def _on_StepCompleted(self, e: dict) -> None:
        self.sampling = None
        self.iteration, self.iteration_steps = e["iteration"], e["steps"]
        self.step, self.global_step = e["step"], e["global_step"]
        self.steps[e["global_step"]] = e

    def _on_IterationCompleted(self, e: dict) -> None:
        self.per_iteration.setdefault(e["iteration"], {}).update(
            {
                k: e.get(k)
                for k in (
                    "loss",
                    "mi_bound",
                    "row_accuracy",
                    "column_accuracy",
                    "heldout_ppl",
                    "ppl_ratio",
                    "drift_prompted",
                    "drift_plain",
                    "heldout_mi",
                    "healthy",
                )
            }
        )
        self.step = self.iteration_steps

    def _on_RunWarning(self, e: dict) -> None:
        self.warnings.append(e["message"])

    def _on_RunCompleted(self, e: dict) -> None:
        self.sampling = None
        self.status = "stopped" if e.get("stopped_early") else "finished"
        self.reason = e.get("reason", "")
        if e.get("adapters"):
            self.kept = e["adapters"] + (f" ({e['kept']})" if e.get("kept") else "")
            self.kept_name = e["adapters"]

    # ---- what the screen reads ------------------------------------------------------------

    @property
    def last_step(self) -> dict | None:
        return self.steps[max(self.steps)] if self.steps else None

    def series(self, key: str) -> list[float]:
        """One metric per logged step, in step order (non-finite values left out)."""
        values = [self.steps[s].get(key) for s in sorted(self.steps)]
        return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]

    @property
    def completed_iterations(self) -> int:
        return sum(1 for row in self.per_iteration.values() if "loss" in row)

    @property
    def live(self) -> bool:
        """Whether the run is going on in this app (its sampling and warnings are news, not history)."""
        return self.status in ("running", "starting", "resuming")

    def drift_limits(self) -> tuple[float | None, float | None]:
        """The degeneration guard's limits as (without, with the constitution): --max-ppl-ratio and
        --max-prompted-ratio from the run's config (the engine's defaults where it names none); both None
        when the guard is off."""
        defaults = TrainConfig()
        plain = self.config.get("max_ppl_ratio", defaults.max_ppl_ratio)
        if self.monitor is not None and "limit" in self.monitor:
            plain = self.monitor["limit"]  # what the run measured against
        if plain is None:
            return None, None
        return plain, self.config.get("max_prompted_ratio", defaults.max_prompted_ratio)


def load_run(run_dir: str | Path) -> RunView:
    """A past (or running) run, replayed from its metrics.jsonl; state.json tells an unfinished one."""
    run = Path(run_dir).expanduser()
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise SamiError(f"{run}: no metrics.jsonl there; pick a run directory made by `sami-mlx train`")
    view = RunView(run_dir=str(run))
    for row in read_jsonl(metrics):
        view.apply(row)
    if view.status == "running":  # no RunCompleted: killed, or still running in another process
        view.status, view.reason = "incomplete", "no RunCompleted event; resume it to finish"
    state = run / "state.json"
    if view.status == "stopped" and state.is_file() and not RunState.load(state).finished:
        view.reason = (view.reason + "; " if view.reason else "") + "resumable"
    return view


def is_resumable(run_dir: str | Path) -> bool:
    """A run whose state.json says it has iterations left."""
    state = Path(run_dir).expanduser() / "state.json"
    if not (state.is_file() and (state.parent / "config.yaml").is_file()):
        return False
    try:
        return not RunState.load(state).finished
    except SamiError:
        return False


@dataclass(frozen=True)
class RunSummary:
    """One line of the run picker."""

    path: Path
    status: str
    detail: str


def list_runs(runs_dir: str | Path) -> list[RunSummary]:
    """Run directories under `runs_dir` (newest name first) with their status."""
    root = Path(runs_dir).expanduser()
    if not root.is_dir():
        return []
    out = []
    for d in sorted((p for p in root.iterdir() if (p / "metrics.jsonl").is_file()), reverse=True):
        try:
            view = load_run(d)
        except SamiError:
            continue
        loss = view.last_step.get("loss") if view.last_step else None
        detail = f"{view.completed_iterations}/{view.iterations} iterations"
        if loss is not None:
            detail += f", loss {loss:.4f}"
        out.append(RunSummary(d, view.status, detail))
    return out


def read_samples(run_dir: str | Path, iteration: int) -> list[dict]:
    """The rollouts of one iteration (iter-NN/samples.jsonl): query, variants, responses, kept; for a
    run stopped during that iteration's sampling, the groups it had sampled (samples.partial.jsonl)."""
    folder = Path(run_dir).expanduser() / f"iter-{iteration:02d}"
    if (folder / "samples.jsonl").is_file():
        return read_jsonl(folder / "samples.jsonl")
    return [row for row in read_jsonl(folder / PARTIAL) if "slot" in row]


def sample_iterations(run_dir: str | Path) -> list[int]:
    """Iterations (1-based) with samples: samples.jsonl, or the partial file of a stopped sampling."""
    run = Path(run_dir).expanduser()
    found = []
    for d in run.glob("iter-*"):
        if ((d / "samples.jsonl").is_file() or (d / PARTIAL).is_file()) and d.name[5:].isdigit():
            found.append(int(d.name[5:]))
    return sorted(found)


def printable(text: str) -> str:
    """Model output made safe for a terminal: control and unassigned characters shown as '�'."""
    return "".join(
        c if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Cn") else "\ufffd" for c in text
    )


def short_path(path: str | Path) -> str:
    """A path relative to the working directory when it lies inside it (stable in screenshots)."""
    p = Path(path).expanduser()
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


# ---- the run's verdict: its result files and the adapters it kept ---------------------------------


@dataclass(frozen=True)
class PrincipleResult:
    """One principle's result: adherence before and after (a demo), or the win rate alone (an eval)."""

    name: str
    before: float | None
    after: float | None
    held_out: bool = False  # never in a training prompt (the demo's held-out principle)


@dataclass(frozen=True)
class RunResult:
    """What an evaluation of the run measured against the base model (RUN/demo.json or RUN/eval/*.json)."""

    source: str  # the file, relative to the run
    checkpoint: str  # the adapters measured
    judge: str  # who judged the pairs
    n: int
    win_rate: float | None
    win_rate_ci: tuple[float, float] | None
    adherence: tuple[float, float] | None = None  # overall, base and SAMI (a demo)
    mi_bound: tuple[float, float] | None = None  # held-out MI bound, base and checkpoint (an eval)
    principles: tuple[PrincipleResult, ...] = ()
    metric: str = "adherence"  # what PrincipleResult holds: "adherence" (before/after) or "win rate"


def _pair(d: dict | None, a: str, b: str) -> tuple[float, float] | None:
    if not isinstance(d, dict) or not all(isinstance(d.get(k), (int, float)) for k in (a, b)):
        return None
    return float(d[a]), float(d[b])


def _ci(value) -> tuple[float, float] | None:
    return (float(value[0]), float(value[1])) if isinstance(value, (list, tuple)) and len(value) == 2 else None


def demo_result(data: dict) -> RunResult:
    """RUN/demo.json (sami_mlx.toy.demo): adherence per principle, base vs SAMI, and the win rate."""
    base, sami = data.get("base_adherence") or {}, data.get("sami_adherence") or {}
    principles = [PrincipleResult(k, base[k], sami.get(k)) for k in base if k != "overall"]
    h = data.get("heldout") or {}
    if h.get("principle"):
        principles.append(PrincipleResult(h["principle"], h.get("base_adherence"), h.get("sami_adherence"), True))
    kept = (data.get("kept") or {}).get("name", "")
    return RunResult(
        source="demo.json",
        checkpoint=kept or "the run's adapters",
        judge="the world's checker",
        n=int(data.get("n_eval") or 0),
        win_rate=data.get("win_rate"),
        win_rate_ci=_ci(data.get("win_rate_ci")),
        adherence=_pair({"b": base.get("overall"), "a": sami.get("overall")}, "b", "a"),
        principles=tuple(principles),
    )


def eval_result(run: Path, path: Path, data: dict) -> RunResult:
    """RUN/eval/<checkpoint>.json (sami_mlx.evaluation.report): the win rate, per principle when judged so."""
    judge, per, intrinsic = data.get("judge") or {}, data.get("per_principle") or {}, data.get("intrinsic") or {}

    def mi(side: str):
        return (intrinsic.get(side) or {}).get("mi_bound")

    return RunResult(
        source=str(path.relative_to(run)),
        checkpoint=str(data.get("checkpoint", path.stem)),
        judge=str(judge.get("model") or judge.get("kind") or "a judge"),
        n=int(data.get("n") or 0),
        win_rate=data.get("win_rate"),
        win_rate_ci=_ci(data.get("win_rate_ci")),
        mi_bound=_pair({"b": mi("base"), "a": mi("checkpoint")}, "b", "a"),
        principles=tuple(PrincipleResult(k, None, v.get("win_rate")) for k, v in per.items() if isinstance(v, dict)),
        metric="win rate",
    )


def read_result(run_dir: str | Path, kept: str = "") -> RunResult | None:
    """The run's measured result: demo.json, else the eval file of the kept checkpoint (else the newest);
    None when the run has none (or only unreadable ones)."""
    import json

    run = Path(run_dir).expanduser()
    demo = run / "demo.json"
    try:
        if demo.is_file():
            return demo_result(json.loads(demo.read_text(encoding="utf-8")))
        files = sorted(p for p in (run / "eval").glob("*.json") if p.name != "summary.json")
        if not files:
            return None
        chosen = next((p for p in files if p.stem == kept), files[-1])
        return eval_result(run, chosen, json.loads(chosen.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return None  # a torn or foreign file: no verdict rather than a crash


def read_kept(run_dir: str | Path) -> tuple[str, str]:
    """(name, why) of the adapters RUN/adapters.safetensors holds, from state.json; ("", "") before the
    run kept any."""
    from sami_mlx.loop.kept import describe_kept

    state = Path(run_dir).expanduser() / "state.json"
    if not state.is_file():
        return "", ""
    try:
        kept = RunState.load(state).kept
    except SamiError:
        return "", ""
    return (kept["name"], describe_kept(kept)) if kept else ("", "")


def eval_command(run_dir: str | Path, checkpoint: str = "") -> str:
    """The command that measures the run against its base model (a judge and held-out queries to fill in)."""
    which = f" --iterations {checkpoint}" if checkpoint.startswith("iter-") and " " not in checkpoint else ""
    return f"sami-mlx eval --run {short_path(run_dir)}{which} --queries HELDOUT --judge JUDGE"


def kept_name(run_dir: str | Path) -> str:
    """The checkpoint name of the adapters the run kept (state.json, else its RunCompleted event); ""
    while it has kept none."""
    name = read_kept(run_dir)[0]
    if name:
        return name
    metrics = Path(run_dir).expanduser() / "metrics.jsonl"
    try:
        rows = read_jsonl(metrics) if metrics.is_file() else []
    except SamiError:
        return ""
    done = [r for r in rows if r.get("event") == "RunCompleted" and r.get("adapters")]
    return str(done[-1]["adapters"]) if done else ""


# ---- base against aligned: the same query answered by both -----------------------------------------


@dataclass(frozen=True)
class ReplyPair:
    """One query (or the variant it was asked under) answered by the base model and by the aligned one."""

    query: str
    base: str
    aligned: str


def read_pairs(run_dir: str | Path, kept: str = "") -> tuple[str, list[ReplyPair]]:
    """(where from, pairs) of base and aligned replies to the same prompts: the kept checkpoint's eval result
    (else the newest), else demo.json's examples; ("", []) when the run has neither."""
    import json

    run = Path(run_dir).expanduser()
    try:
        files = sorted(p for p in (run / "eval").glob("*.json") if p.name != "summary.json")
        if files:
            chosen = next((p for p in files if p.stem == kept), files[-1])
            data = json.loads(chosen.read_text(encoding="utf-8"))
            items = [i for i in data.get("items", []) if isinstance(i, dict)]
            pairs = [ReplyPair(str(i["query"]), str(i["base"]), str(i["checkpoint"])) for i in items]
            if pairs:
                return f"{data.get('checkpoint', chosen.stem)} against base (eval/{chosen.name})", pairs
        demo = run / "demo.json"
        if demo.is_file():
            data = json.loads(demo.read_text(encoding="utf-8"))
            examples = [e for e in data.get("examples", []) if isinstance(e, dict)]
            pairs = [ReplyPair(f"variant {e.get('variant', '?')}", str(e["base"]), str(e["sami"])) for e in examples]
            if pairs:
                return "SAMI against base (demo.json)", pairs
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        pass  # a torn or foreign file: no comparison rather than a crash
    return "", []

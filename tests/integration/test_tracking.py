"""--report-to: a run's events reach Weights & Biases and SwanLab (offline, through mlx-lm's reporting
callbacks), only from rank 0, and a wrong or missing tracker is a one-line error before any work."""

import json
from pathlib import Path
from types import SimpleNamespace

import mlx_lm.tuner.callbacks as mlx_callbacks
import pytest
import wandb

from sami_mlx import events as ev
from sami_mlx.cli import train as cli_train
from sami_mlx.cli.train import main
from sami_mlx.config import TrainConfig
from sami_mlx.fileio import read_jsonl
from sami_mlx.tracking import Tracker, resumed_report_to


def flags(model, constitution, queries, out, *extra):
    return [
        *("--model", str(model), "--constitution", str(constitution), "--queries", str(queries)),
        *("--iterations", "1", "--steps", "2", "--queries-per-step", "2", "--max-tokens", "8"),
        *("--temperature", "1.0", "--seed", "3", "--max-ppl-ratio", "off", "--monitor-queries", "2"),
        *("--monitor-every", "1", "--out", str(out), *extra),
    ]


class FakeTracker:
    """Stands in for the wandb or swanlab module where mlx-lm's callbacks look for it; records every call."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.run = SimpleNamespace(summary=SimpleNamespace(update=lambda d: self.calls.append(("summary", d))))

    def init(self, **kw):
        self.calls.append(("init", kw))

    def log(self, data, step=None):
        self.calls.append(("log", dict(data), step))

    def finish(self, **kw):
        self.calls.append(("finish", kw))

    def Table(self, columns, data):  # noqa: N802 (wandb's name)
        return ("table", list(columns), [list(r) for r in data])

    def Text(self, content, caption=None):  # noqa: N802 (swanlab's name)
        return ("text", content, caption)

    def logged(self) -> list[tuple[dict, int]]:
        return [(c[1], c[2]) for c in self.calls if c[0] == "log"]

    def values(self, key: str) -> list[tuple[int, object]]:
        """(step, value) of every log of `key`."""
        return [(step, data[key]) for data, step in self.logged() if key in data]


@pytest.fixture
def fakes(monkeypatch):
    wandb, swanlab = FakeTracker(), FakeTracker()
    monkeypatch.setattr(mlx_callbacks, "wandb", wandb)
    monkeypatch.setattr(mlx_callbacks, "swanlab", swanlab)
    return wandb, swanlab


def step(it, s, g, loss):
    return ev.StepCompleted(
        it, s, 2 * it, g, loss, 0.1 * g, 0.5, 0.25, 0.01, 3e-4, 1.0, 100.0 + g, 1.5, [[0.0]], anchor_kl=0.02
    )


def monitor(it, s, drift):
    return ev.MonitorChecked(it, s, drift, 1.1, True, None, heldout_mi=0.3 if s == 2 * it else None)


def samples(it, text):
    example = {"query": f"q{it}", "variants": ["++", "-+"], "responses": [f"{text} a", f"{text} b"]}
    return ev.SamplesReady(it, 2, 0, 0, 0, 5.0, 0.5, 0.9, 50.0, examples=[example])


def run_events(run_dir: Path) -> list[ev.Event]:
    """Two paper-schedule iterations (2 then 4 steps) with the monitor checking every 2 steps; its
    checks come before the event of the step they checked, as the loop sends them."""
    config = TrainConfig(model="m", constitution="c", iterations=2, steps=2, out=str(run_dir)).resolved().to_dict()
    out: list[ev.Event] = [ev.RunStarted(str(run_dir), config, 2, 6, 4, 1000, None, base_heldout_mi=0.05)]
    out += [samples(1, "first"), step(1, 1, 1, 0.9), monitor(1, 2, 1.2), step(1, 2, 2, 0.8)]
    out += [ev.IterationCompleted(1, 0.85, 0.2, 0.5, 0.25, "iter-01", drift_prompted=1.2)]
    out += [samples(2, "second"), step(2, 1, 3, 0.7), monitor(2, 2, 1.3), step(2, 2, 4, 0.6), step(2, 3, 5, 0.5)]
    out += [monitor(2, 4, 1.4), step(2, 4, 6, 0.4), ev.IterationCompleted(2, 0.45, 0.5, 0.75, 0.5, "iter-02")]
    return out + [ev.RunCompleted(str(run_dir), 12.0, adapters="iter-02", kept="best held-out MI bound +0.30")]


def test_events_are_logged_at_their_optimizer_step_to_both_trackers(fakes, tmp_path):
    wandb, swanlab = fakes
    with Tracker("wandb,swanlab") as tracker:
        for event in run_events(tmp_path / "run-a"):
            tracker(event)

    # mlx-lm's callbacks started one run per tracker, named after the run directory, files inside it.
    init = [c[1] for c in wandb.calls if c[0] == "init"]
    assert init == [
        {"project": "sami-mlx", "name": "run-a", "dir": str(tmp_path / "run-a"), "config": init[0]["config"]}
    ]
    assert init[0]["config"]["iterations"] == 2
    sw_init = [c[1] for c in swanlab.calls if c[0] == "init"]
    assert sw_init[0]["experiment_name"] == "run-a" and sw_init[0]["logdir"] == str(tmp_path / "run-a" / "swanlog")

    for fake in (wandb, swanlab):
        steps = [s for _, s in fake.logged()]
        assert steps == sorted(steps), "a tracker drops a log whose step goes back"
        assert fake.values("train/loss") == [(1, 0.9), (2, 0.8), (3, 0.7), (4, 0.6), (5, 0.5), (6, 0.4)]
        assert fake.values("train/mi_bound")[-1] == (6, pytest.approx(0.6))
        assert fake.values("train/row_accuracy")[0] == (1, 0.5)
        assert fake.values("train/column_accuracy")[0] == (1, 0.25)
        assert fake.values("train/tokens_per_sec")[2] == (3, 103.0)
        assert fake.values("train/peak_memory_gb")[0] == (1, 1.5)
        # Each check at the optimizer step it checked: iteration 2 starts after the first one's 2 steps.
        assert fake.values("monitor/drift_prompted") == [(2, 1.2), (4, 1.3), (6, 1.4)]
        assert fake.values("monitor/heldout_mi") == [(2, 0.3), (6, 0.3)]
        assert fake.values("monitor/base_heldout_mi") == [(0, 0.05)]
        assert fake.values("iteration/mi_bound") == [(2, 0.2), (6, 0.5)]
        assert fake.values("sampling/tokens_per_sec") == [(0, 50.0), (2, 50.0)]
        assert fake.values("run/seconds") == [(6, 12.0)]

    # The samples table grows by each iteration's responses (a logged wandb table is final).
    tables = wandb.values("samples")
    assert [s for s, _ in tables] == [0, 2]
    kind, columns, rows = tables[-1][1]
    assert kind == "table" and columns == ["iteration", "query", "variant", "response"]
    assert rows == [
        [1, "q1", "++", "first a"],
        [1, "q1", "-+", "first b"],
        [2, "q2", "++", "second a"],
        [2, "q2", "-+", "second b"],
    ]
    assert swanlab.values("samples")[1] == (
        2,
        [("text", "second a", "iter 2 ++: q2"), ("text", "second b", "iter 2 -+: q2")],
    )
    assert ("summary", {"adapters": "iter-02", "kept": "best held-out MI bound +0.30", "reason": ""}) in wandb.calls
    assert wandb.calls[-1] == ("finish", {"exit_code": 0}) and swanlab.calls[-1] == ("finish", {"state": "success"})


def test_a_run_that_ends_without_run_completed_is_marked_failed(fakes, tmp_path):
    wandb, swanlab = fakes
    tracker = Tracker("wandb,swanlab")
    tracker(ev.StepCompleted(1, 1, 2, 1, 0.9, 0.1, 0.5, 0.5, 0.0, 1e-3, 1.0, 1.0, 1.0, []))  # before RunStarted
    assert wandb.calls == []
    for event in run_events(tmp_path / "run")[:4]:
        tracker(event)
    tracker.close()
    tracker.close()
    assert [c for c in wandb.calls if c[0] == "finish"] == [("finish", {"exit_code": 1})]
    assert [c for c in swanlab.calls if c[0] == "finish"] == [("finish", {"state": "crashed"})]


def test_resumed_run_continues_from_its_step(fakes, tmp_path):
    wandb, _ = fakes
    events = run_events(tmp_path / "run")
    events[0].resumed_at_step = 3
    with Tracker("wandb") as tracker:
        for event in [events[0], *events[8:]]:  # after global step 3 (iteration 2, step 1)
            tracker(event)
    assert wandb.values("train/loss") == [(4, 0.6), (5, 0.5), (6, 0.4)]
    assert wandb.values("monitor/drift_prompted") == [(4, 1.3), (6, 1.4)]


def test_unknown_tracker_is_a_one_line_error(tmp_path, capsys):
    assert main(["--model", "m", "--constitution", "c", "--report-to", "wandb,mlflow", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --report-to wandb,mlflow: unknown tracker 'mlflow'; ")
    assert "choose from wandb, swanlab" in err
    cfg = TrainConfig(model="m", constitution="c", report_to=" SwanLab, wandb,swanlab").resolved()
    assert cfg.report_to == "swanlab,wandb"
    assert TrainConfig(model="m", constitution="c", report_to="off").resolved().report_to == ""


def test_tracker_not_installed_stops_before_any_work(
    tiny_model, constitution_file, queries_file, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(mlx_callbacks, "swanlab", None)  # as mlx-lm leaves it when `import swanlab` fails
    out = tmp_path / "run"
    assert main(flags(tiny_model, constitution_file, queries_file, out, "--report-to", "swanlab")) == 2
    assert (
        capsys.readouterr().err
        == "error: --report-to swanlab: swanlab is not installed; pip install 'sami-mlx[swanlab]'\n"
    )
    assert not out.exists()


def test_only_rank_0_reports(fakes, tmp_path, monkeypatch):
    """The CLI gives other ranks no tracker (and the loop calls no callbacks there)."""
    seen = []
    monkeypatch.setattr("sami_mlx.loop.trainer.train", lambda cfg, callbacks, ranks: seen.append(callbacks))
    args = cli_train.make_parser().parse_args(["--model", "m", "--constitution", "c", "--report-to", "wandb"])
    for primary in (True, False):
        cli_train._train(args, SimpleNamespace(size=2, primary=primary, rank=0 if primary else 1))
    assert [type(cb).__name__ for cb in seen[0]] == ["Tracker", "ProgressBar"]
    assert [type(cb).__name__ for cb in seen[1]] == ["ProgressBar"]


def test_resume_reports_where_the_flag_says_else_where_the_run_did(tmp_path):
    (tmp_path / "config.yaml").write_text("model: m\nconstitution: c\nreport_to: wandb\n")
    assert resumed_report_to(str(tmp_path), None) == "wandb"
    assert resumed_report_to(str(tmp_path), "off") == ""
    assert resumed_report_to(str(tmp_path), "swanlab") == "swanlab"
    assert resumed_report_to(str(tmp_path / "missing"), None) == ""


def test_offline_run_writes_wandb_and_swanlab_files_with_the_logged_keys(
    tiny_model, constitution_file, queries_file, tmp_path, monkeypatch
):
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "SWANLAB_ROOT"):
        monkeypatch.setenv(name, str(tmp_path / "home" / name))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("SWANLAB_MODE", "offline")
    out = tmp_path / "run"
    assert main(flags(tiny_model, constitution_file, queries_file, out, "--report-to", "wandb,swanlab")) == 0
    metrics = read_jsonl(out / "metrics.jsonl")
    assert any(m["event"] == "MonitorChecked" for m in metrics)
    responses = {
        r for group in read_jsonl(out / "iter-01" / "samples.jsonl") if group["kept"] for r in group["responses"]
    }

    keys = [b"train/loss", b"train/mi_bound", b"train/row_accuracy", b"train/column_accuracy"]
    keys += [b"train/tokens_per_sec", b"train/peak_memory_gb", b"monitor/drift_prompted", b"monitor/drift_plain"]
    keys += [b"iteration/mi_bound", b"sampling/tokens_per_sec"]
    wandb.teardown()  # wandb's service writes the run file in the background: wait for it, as at exit
    (wandb_run,) = (out / "wandb").glob("offline-run-*")
    (records,) = wandb_run.glob("run-*.wandb")
    data = records.read_bytes()
    assert [k for k in keys if k not in data] == []
    (table,) = wandb_run.glob("files/media/table/samples_*.table.json")
    table = json.loads(table.read_text())
    assert table["columns"] == ["iteration", "query", "variant", "response"]
    assert table["data"] and {row[3] for row in table["data"]} <= responses

    (swan_run,) = (out / "swanlog").glob("run-*")
    (records,) = swan_run.glob("run-*.swanlab")
    data = records.read_bytes()
    assert [k for k in keys if k not in data] == []
    texts = {p.read_text() for p in swan_run.glob("media/text/*.txt")}
    assert texts & responses


def test_resume_may_report_elsewhere_than_the_run_did(fakes, trained_run, capsys):
    """Where a run reports is no part of what it trains: --resume takes --report-to without calling it a change."""
    run = trained_run(iterations=1) / "run"
    assert main(["--resume", str(run), "--report-to", "wandb"]) == 2
    assert "already finished" in capsys.readouterr().err
    assert main(["--resume", str(run), "--learning-rate", "0.5"]) == 2
    assert "differs from the run's" in capsys.readouterr().err

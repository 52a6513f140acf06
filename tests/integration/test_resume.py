import json

import mlx.core as mx
import pytest
from helpers import RESUMABLE

from sami_mlx import events as ev
from sami_mlx.cli.train import main
from sami_mlx.errors import SamiError
from sami_mlx.fileio import read_jsonl
from sami_mlx.loop.trainer import resume, train

SETTINGS = dict(RESUMABLE, seed=11)


def adapters(run):
    return mx.load(str(run / "adapters.safetensors"))


def stop_after(n_steps):
    seen = []

    def on_event(e):
        if isinstance(e, ev.StepCompleted):
            seen.append(e)

    return on_event, (lambda: len(seen) >= n_steps)


@pytest.mark.parametrize("schedule", ["paper", "continue"])
@pytest.mark.parametrize("stop_at", [1, 2, 3])
def test_stopped_and_resumed_run_ends_bit_identical(tiny_config, tmp_path, schedule, stop_at):
    full = tmp_path / "full"
    train(tiny_config(SETTINGS, out=full, schedule=schedule))

    part = tmp_path / "part"
    on_event, should_stop = stop_after(stop_at)
    result = train(
        tiny_config(SETTINGS, out=part, schedule=schedule),
        callbacks=[on_event],
        should_stop=should_stop,
    )
    assert result.stopped_early and result.reason == "cancelled"
    state = json.loads((part / "state.json").read_text())
    assert not state["finished"] and state["global_step"] == stop_at

    resumed = resume(part)
    assert not resumed.stopped_early
    a, b = adapters(full), adapters(part)
    assert a.keys() == b.keys()
    assert all(mx.array_equal(a[k], b[k]).item() for k in a), "resumed adapters differ from an uninterrupted run"
    assert json.loads((part / "state.json").read_text())["finished"]
    steps = [r["global_step"] for r in read_jsonl(part / "metrics.jsonl") if r["event"] == "StepCompleted"]
    total = 2 + 4 if schedule == "paper" else 2 + 2
    assert steps == list(range(1, total + 1))  # every step logged once across both processes
    # The resumed process reports its memory estimate, as the first did.
    started = [r for r in read_jsonl(part / "metrics.jsonl") if r["event"] == "RunStarted"]
    assert len(started) == 2 and all(r["memory_estimate_gb"] for r in started)


def test_resume_refuses_finished_run_and_changed_settings(tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    on_event, should_stop = stop_after(1)
    train(tiny_config(SETTINGS, out=out), callbacks=[on_event], should_stop=should_stop)
    before = (out / "state.json").read_bytes()
    assert main(["--resume", str(out), "--learning-rate", "0.1"]) == 2
    assert "differs from the run's" in capsys.readouterr().err
    assert (out / "state.json").read_bytes() == before
    assert main(["--resume", str(out)]) == 0
    with pytest.raises(SamiError, match="already finished"):
        resume(out)


def test_lock_names_the_live_holder_and_takes_over_stale_locks(tiny_config, tmp_path, capsys):
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    on_event, should_stop = stop_after(1)
    train(tiny_config(SETTINGS, out=out), callbacks=[on_event], should_stop=should_stop)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (out / ".lock").write_text(str(holder.pid))
        assert main(["--resume", str(out)]) == 2
        assert f"PID {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale and the resume goes ahead.
    assert main(["--resume", str(out)]) == 0
    assert not (out / ".lock").exists()
    assert os.path.exists(out / "iter-02" / "adapters.safetensors")

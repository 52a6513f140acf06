"""Numerical guards: a non-finite loss skips the step (counted, warned once); three in a row stop
the run with a clear message and the last good step state kept."""

import json

import mlx.core as mx
import pytest

import sami_mlx.loop.trainer as trainer
import sami_mlx.objective as objective
from sami_mlx import events as ev
from sami_mlx.cli.train import main
from sami_mlx.errors import RunAborted
from sami_mlx.fileio import read_jsonl

# The monitor is off: these runs are about the loss, not the drift.
NAN_RUN = dict(learning_rate=1e-3, monitor_queries=0)


def poison(monkeypatch, bad_calls):
    """Make the SAMI loss NaN on the given (1-based) calls."""
    calls = []
    real = objective.sami_loss

    def loss(S):
        calls.append(1)
        value = real(S)
        return value * mx.array(float("nan")) if len(calls) in bad_calls else value

    monkeypatch.setattr(objective, "sami_loss", loss)


def test_nan_step_is_skipped_counted_and_warned_once(tiny_config, tmp_path, monkeypatch):
    poison(monkeypatch, bad_calls={2})
    seen = []
    out = tmp_path / "run"
    trainer.train(tiny_config(NAN_RUN, steps=3, out=out), callbacks=[seen.append])
    steps = [e for e in seen if isinstance(e, ev.StepCompleted)]
    warnings = [e for e in seen if isinstance(e, ev.RunWarning) and "not finite" in e.message]
    assert [e.step for e in steps] == [1, 3]  # step 2 was skipped, not logged as trained
    assert len(warnings) == 1
    state = json.loads((out / "state.json").read_text())
    assert state["skipped_steps"] == 1 and state["finished"]
    assert all(mx.isfinite(v).all().item() for v in mx.load(str(out / "adapters.safetensors")).values())


def test_nan_steps_in_a_row_stop_the_run_keeping_the_last_good_checkpoint(
    tiny_config, tiny_flags, tmp_path, monkeypatch, capsys
):
    poison(monkeypatch, bad_calls={2, 3, 4})
    out = tmp_path / "run"
    with pytest.raises(RunAborted, match="3 steps in a row"):
        trainer.train(tiny_config(NAN_RUN, steps=5, out=out))
    state = json.loads((out / "state.json").read_text())
    good = mx.load(str(out / state["checkpoint"] / "adapters.safetensors"))
    assert all(mx.isfinite(v).all().item() for v in good.values())
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "StepCompleted"] == [1]
    # From the command line the same stop is one line, not a traceback.
    poison(monkeypatch, bad_calls={1, 2, 3})
    flags = tiny_flags(NAN_RUN, steps=4, out=tmp_path / "cli")
    assert main(flags) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: 3 steps in a row had a non-finite loss") and "Traceback" not in "\n".join(err)

"""Crash tests: a training process SIGKILLed at a dozen points always resumes to the same adapters."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from helpers import RESUMABLE

from sami_mlx.cli.train import main

KILL_POINTS = [
    "sampling:1",
    "sampling:6",
    "scoring:1",
    "scoring:4",
    "update:1",
    "update:5",
    "checkpoint:1",
    "checkpoint:4",
    "checkpoint-saved:2",
    "checkpoint-saved:6",
    "iteration-adapters:1",
    "iteration-adapters:2",
]


# A kill can land in any of the state a resume restores.
CRASHABLE = dict(RESUMABLE, seed=4)


@pytest.fixture(scope="module")
def expected(tiny_flags, tmp_path_factory):
    """The adapters of the same run, never interrupted."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(tiny_flags(CRASHABLE, out=run)) == 0
    return mx.load(str(run / "adapters.safetensors"))


def assert_no_half_written_files(run: Path) -> None:
    for path in run.rglob("*"):
        if path.name.startswith(".") or not path.is_file():
            continue  # temporary files are never read; a resume ignores them
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                json.loads(line)
        elif path.suffix == ".safetensors":
            mx.load(str(path))
    state = json.loads((run / "state.json").read_text()) if (run / "state.json").exists() else None
    if state and state["checkpoint"]:
        assert (run / state["checkpoint"] / "adapters.safetensors").exists()
        assert (run / state["checkpoint"] / "optimizer.safetensors").exists()


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_then_resume_gives_the_uninterrupted_result(tiny_flags, expected, tmp_path, point):
    run = tmp_path / "run"
    env = {**os.environ, "SAMI_MLX_KILL_AT": point}
    proc = subprocess.run(
        [sys.executable, "-m", "sami_mlx.train", *tiny_flags(CRASHABLE, out=run)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert_no_half_written_files(run)

    assert main(["--resume", str(run)]) == 0
    got = mx.load(str(run / "adapters.safetensors"))
    assert got.keys() == expected.keys()
    assert all(mx.array_equal(got[k], expected[k]).item() for k in got), f"adapters differ after a kill at {point}"
    assert json.loads((run / "state.json").read_text())["finished"]
    assert not (run / ".lock").exists()
    assert_no_half_written_files(run)

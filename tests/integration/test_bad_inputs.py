"""More bad inputs (beyond test_cli_errors): large files, broken weights and checkpoints, adapters
that do not fit, prompts longer than the context. Each is one line, exit 2, no traceback, and the
run directory is left byte-for-byte as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from sami_mlx.cli.train import main


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def assert_one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture
def stopped_run(tiny_config, tmp_path):
    """A run stopped after its first step (resumable), as a crash would leave it."""
    from sami_mlx import events as ev
    from sami_mlx.loop.trainer import train

    out = tmp_path / "run"
    steps = []
    train(
        tiny_config(steps=2, out=out),
        callbacks=[lambda e: steps.append(e) if isinstance(e, ev.StepCompleted) else None],
        should_stop=lambda: len(steps) >= 1,
    )
    return out


def test_huge_constitution_is_refused(tiny_flags, tmp_path, capsys):
    big = tmp_path / "big.yaml"
    with open(big, "w") as f:
        f.write("name: big\nprinciples:\n")
        line = "  - {name: p%d, positive: " + "x" * 1000 + ", negative: y}\n"
        for i in range(52_000):
            f.write(line % i)
    assert big.stat().st_size > 50 * 2**20
    assert main(tiny_flags(constitution=big, out=tmp_path / "run")) == 2
    assert_one_line_error(capsys, str(big), "MB")
    assert not (tmp_path / "run").exists()


def test_corrupted_model_weights(tiny_model, tiny_flags, tmp_path, capsys):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert main(tiny_flags(model=broken, out=tmp_path / "run")) == 2
    assert_one_line_error(capsys, "--model", str(broken))
    assert not (tmp_path / "run").exists()


def test_model_config_of_another_kind(tiny_model, tiny_flags, tmp_path, capsys):
    odd = tmp_path / "odd-model"
    shutil.copytree(tiny_model, odd)
    config = json.loads((odd / "config.json").read_text())
    config["model_type"] = "no_such_architecture"
    (odd / "config.json").write_text(json.dumps(config))
    assert main(tiny_flags(model=odd, out=tmp_path / "run")) == 2
    assert_one_line_error(capsys, "--model")


def test_prompt_longer_than_the_context(tiny_flags, tmp_path, capsys):
    queries = tmp_path / "long.txt"
    queries.write_text("short question\n" + "word " * 700 + "\n")
    assert main(tiny_flags(queries=queries, out=tmp_path / "run")) == 2
    assert_one_line_error(capsys, str(queries), "query 2", "context")
    assert not (tmp_path / "run").exists()


def test_max_tokens_past_the_context(tiny_flags, tmp_path, capsys):
    assert main(tiny_flags(max_tokens=600, out=tmp_path / "run")) == 2
    assert_one_line_error(capsys, "--max-tokens 600", "context")


def test_resume_with_corrupted_checkpoint(stopped_run, capsys):
    state = json.loads((stopped_run / "state.json").read_text())
    ckpt = stopped_run / state["checkpoint"] / "adapters.safetensors"
    ckpt.write_bytes(b"not a safetensors file")
    before = snapshot(stopped_run)
    assert main(["--resume", str(stopped_run)]) == 2
    assert_one_line_error(capsys, str(stopped_run / state["checkpoint"]), "checkpoint")
    assert snapshot(stopped_run) == before


def test_resume_with_adapters_from_another_model(stopped_run, tmp_path, capsys):
    # Someone edited config.yaml to a different LoRA rank: the saved adapters no longer fit.
    config = yaml.safe_load((stopped_run / "config.yaml").read_text())
    config["lora_rank"] = 4
    (stopped_run / "config.yaml").write_text(yaml.safe_dump(config))
    before = snapshot(stopped_run)
    assert main(["--resume", str(stopped_run)]) == 2
    assert_one_line_error(capsys, "do not match")
    assert snapshot(stopped_run) == before


def test_resume_with_unreadable_state(stopped_run, capsys):
    (stopped_run / "state.json").write_text('{"iteration": ')
    before = snapshot(stopped_run)
    assert main(["--resume", str(stopped_run)]) == 2
    assert_one_line_error(capsys, "state.json", "cannot be resumed")
    assert snapshot(stopped_run) == before


def test_resume_of_something_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    assert main(["--resume", str(tmp_path / "notes")]) == 2
    assert_one_line_error(capsys, "config.yaml", "run directory")


def test_queries_path_is_a_directory(tiny_flags, tmp_path, capsys):
    (tmp_path / "qdir").mkdir()
    assert main(tiny_flags(queries=tmp_path / "qdir", out=tmp_path / "run")) == 2
    assert_one_line_error(capsys, "qdir", "directory")


def test_out_is_a_file(tiny_flags, tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    assert main(tiny_flags(out=target)) == 2
    assert_one_line_error(capsys, str(target), "is a file")
    assert target.read_text() == "keep me"


def test_run_that_cannot_fit_the_machine_is_refused_unless_forced(tiny_flags, tmp_path, capsys, monkeypatch):
    from sami_mlx import machine

    tiny_machine = machine.MachineMemory(total=2**20, usable=2**20)  # a 1 MB machine
    monkeypatch.setattr(machine, "machine_memory", lambda total_gb=None: tiny_machine)
    flags = tiny_flags(out=tmp_path / "run")
    assert main(flags) == 2
    assert_one_line_error(capsys, "needs about", "--force")
    assert not (tmp_path / "run").exists()
    assert main([*flags, "--force"]) == 0
    started = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert started["event"] == "RunStarted" and started["memory_estimate_gb"] > 0

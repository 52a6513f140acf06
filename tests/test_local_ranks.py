"""Ranks on one machine without mlx.launch (`run_local_ranks`, what `sami-mlx demo` uses on a CPU):
the toy model built by two ranks is the one-process model, the demo runs end to end on two ranks,
and a failed rank or a Ctrl-C ends every rank within seconds with one line."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import pytest
from test_demo import small_preset

from sami_mlx.cli.main import main
from sami_mlx.loop.distributed import run_local_ranks

ROOT = Path(__file__).resolve().parents[1]


def script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "rank.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child not yet reaped by its parent is a zombie: gone for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


def test_each_rank_gets_its_place_and_a_share_of_the_cores(tmp_path, capfd):
    argv = script(
        tmp_path,
        """
        import json, os
        from pathlib import Path
        hosts = json.loads(Path(os.environ["MLX_HOSTFILE"]).read_text())
        print("rank", os.environ["MLX_RANK"], "of", len(hosts), "threads", os.environ["OPENBLAS_NUM_THREADS"])
        """,
    )
    assert run_local_ranks(argv, 2, tmp_path) == 0
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"rank 0 of 2 threads {threads}" in capfd.readouterr().out  # rank 0 writes to the terminal
    assert (tmp_path / "rank1.log").read_text().strip() == f"rank 1 of 2 threads {threads}"


def test_a_failed_rank_ends_the_others_at_once_with_its_last_line(tmp_path, capfd):
    argv = script(
        tmp_path,
        """
        import os, sys, time
        from pathlib import Path
        Path(os.environ["MLX_HOSTFILE"]).with_name(f"pid{os.environ['MLX_RANK']}").write_text(str(os.getpid()))
        if os.environ["MLX_RANK"] == "1":
            time.sleep(0.5)
            sys.exit("error: rank 1 could not read its inputs")
        time.sleep(600)  # rank 0 would wait for rank 1 at its next collective
        """,
    )
    pids = []
    real_popen = subprocess.Popen

    def popen(*args, **kw):
        proc = real_popen(*args, **kw)
        pids.append(proc.pid)
        return proc

    start = time.monotonic()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess, "Popen", popen)
        code = run_local_ranks(argv, 2, tmp_path)
    assert code == 1 and time.monotonic() - start < 10
    err = capfd.readouterr().err
    assert "rank 1 stopped (exit code 1): error: rank 1 could not read its inputs" in err
    assert str(tmp_path / "rank1.log") in err
    assert not any(alive(p) for p in pids)


def test_ctrl_c_ends_every_rank_within_seconds(tmp_path):
    ranks = script(
        tmp_path,
        """
        import os, time
        from pathlib import Path
        Path(os.environ["MLX_HOSTFILE"]).parent.parent.joinpath(f"rank{os.environ['MLX_RANK']}.pid").write_text(str(os.getpid()))
        time.sleep(600)
        """,
    )
    supervisor = tmp_path / "supervise.py"
    supervisor.write_text(
        f"import sys; from pathlib import Path; from sami_mlx.loop.distributed import run_local_ranks\n"
        f"sys.exit(run_local_ranks({ranks!r}, 2, Path({str(tmp_path)!r})))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, str(supervisor)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C's default action: a test suite started in the background inherits SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    pid_files = [tmp_path / "rank0.pid", tmp_path / "rank1.pid"]
    deadline = time.monotonic() + 60
    while not all(f.exists() and f.read_text() for f in pid_files):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    pids = [int(f.read_text()) for f in pid_files]
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)  # what the terminal sends the supervisor (the ranks ignore it)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.monotonic() - start < 5
    assert err.strip().splitlines()[-1] == "interrupted"
    assert not any(alive(p) for p in pids)


TINY_RECIPE = {
    **small_preset()["recipe"],
    "documents": 1200,
    "steps": 30,
    "warmup": 5,
    "batch_size": 16,
    "curriculum": {**small_preset()["recipe"]["curriculum"], "steps": 10},
}


def test_two_ranks_build_the_toy_model_one_process_builds(tmp_path, monkeypatch):
    from sami_mlx.toy.pretrain import ensure_toy_model, toy_model_dir

    (tmp_path / "recipe.json").write_text(json.dumps(TINY_RECIPE))
    argv = script(
        tmp_path,
        f"""
        import json
        from pathlib import Path
        from sami_mlx.loop.distributed import Ranks
        from sami_mlx.toy.pretrain import ensure_toy_model
        losses = []
        recipe = json.loads(Path({str(tmp_path / "recipe.json")!r}).read_text())
        ensure_toy_model(recipe, lambda n, total, loss: losses.append(loss), Ranks.world())
        print("losses", json.dumps(losses))
        """,
    )
    monkeypatch.setenv("SAMI_MLX_CACHE", str(tmp_path / "two"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    assert run_local_ranks(argv, 2, tmp_path) == 0
    two = toy_model_dir(TINY_RECIPE)
    rank1_losses = json.loads((tmp_path / "rank1.log").read_text().split("losses ")[-1])
    # One model in the cache, no half-built copy left beside it.
    assert [p.name for p in two.parent.iterdir()] == [two.name]

    monkeypatch.setenv("SAMI_MLX_CACHE", str(tmp_path / "one"))
    losses: list[float] = []
    one = ensure_toy_model(TINY_RECIPE, lambda n, total, loss: losses.append(loss))
    assert one.name == two.name  # the same cache key: the same model, up to rounding
    # Every rank reports the whole batch's loss, and it is the one process's loss.
    assert rank1_losses == pytest.approx(losses, rel=1e-4) and len(losses) == 2
    a, b = mx.load(str(one / "model.safetensors")), mx.load(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert mx.allclose(a[k], b[k], rtol=1e-3, atol=1e-4).item(), k
    assert (one / "tokenizer.json").read_text() == (two / "tokenizer.json").read_text()


def tiny_demo_preset() -> dict:
    preset = small_preset()
    preset["recipe"] = TINY_RECIPE
    preset["demo"].update(train_queries=24, heldout_documents=8, eval_queries=2, heldout_eval_queries=1)
    preset["demo"]["sami"].update(iterations=1, steps=2, queries_per_step=2, max_tokens=8)
    preset["demo"]["sami"]["monitor_queries"] = 4
    return preset


def test_the_demo_runs_on_two_local_ranks(tmp_path, monkeypatch):
    from sami_mlx.toy.demo import run_demo

    (tmp_path / "preset.json").write_text(json.dumps(tiny_demo_preset()))
    run = tmp_path / "run"
    run.mkdir()
    argv = script(
        tmp_path,
        f"""
        import json
        from pathlib import Path
        from sami_mlx.toy.demo import run_demo
        report = run_demo({str(run)!r}, json.loads(Path({str(tmp_path / "preset.json")!r}).read_text()))
        print("report", json.dumps(report))
        """,
    )
    monkeypatch.setenv("SAMI_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    assert run_local_ranks(argv, 2, run) == 0
    assert (run / "rank1.log").read_text().strip().endswith("report null")  # rank 1 trains, rank 0 evaluates
    report = json.loads((run / "demo.json").read_text())
    assert report["n_eval"] == 2 * 4 and 0.0 <= report["sami_adherence"]["overall"] <= 1.0
    assert (run / "iter-01" / "adapters.safetensors").exists()
    # Rank 1 measured the base model (rank 0 the trained one): what reached rank 0 is what one
    # process measures of the same base model (each evaluation seeds its own sampling).
    one = run_demo(tmp_path / "one", tiny_demo_preset())
    assert (
        report["base_adherence"] == one["base_adherence"]
        and report["heldout"]["base_adherence"] == one["heldout"]["base_adherence"]
    )
    assert report["greedy_adherence"]["base"] == one["greedy_adherence"]["base"]
    assert report["ppl_base"] == pytest.approx(one["ppl_base"], rel=1e-6)
    assert [e["base"] for e in report["examples"]] == [e["base"] for e in one["examples"]]


def test_demo_refuses_a_run_directory_before_writing_there(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"event": "RunStarted"}\n')
    for ranks in ("1", "2"):
        assert main(["demo", "--out", str(run), "--ranks", ranks]) == 2
        assert "already holds a run" in capsys.readouterr().err
        assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
    assert main(["demo", "--out", str(tmp_path / "new"), "--ranks", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --ranks 0: give 1 or more processes"

"""Data-parallel SAMI: two local ranks (mlx.launch, ring backend) train (and monitor) what one process
trains, a rank with nothing to score still takes part, and a dead or frozen rank ends the other one."""

import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from helpers import WATCHED, pythonpath

from sami_mlx.cli.local_ranks import run_local_ranks
from sami_mlx.fileio import read_jsonl
from sami_mlx.loop.distributed import RankLost

# The random tiny model repeats one token under greedy decoding; with the wording at the very end
# of the prompt that token differs between variants often enough (not always: some groups are
# dropped as identical, which the schedule has to handle the same way on both sides).
CONSTITUTION = """\
name: test
principles:
  - {name: brief, positive: Be brief, negative: Be long}
  - {name: kind, positive: Be kind, negative: Be rude}
"""
TEMPLATE = "{query}\n{constitution}\n"
TOLERANCE = 1e-5
# The reference runs have both KL terms on: their values are summed over the ranks like the loss.
REGULARISED = dict(kl_beta=0.1, anchor_beta=0.5)
LAUNCH = Path(sys.executable).with_name("mlx.launch")


# temperature 0: greedy decoding gives each prompt the same tokens in any batch, so the ranks'
# shards sample exactly what one process samples.
DISTRIBUTED = dict(
    iterations=2,
    steps=2,
    queries_per_step=3,
    max_tokens=8,
    temperature=0.0,
    learning_rate=1e-4,
    seed=3,
    variants="paper",
    **WATCHED,
)


@pytest.fixture(scope="module")
def flags(tiny_flags, tmp_path_factory):
    """`flags(*settings, **overrides)`: the DISTRIBUTED run's flags, with this module's constitution and template."""
    template = tmp_path_factory.mktemp("template") / "t.txt"
    template.write_text(TEMPLATE)
    return lambda *settings, **kw: tiny_flags(
        DISTRIBUTED, *settings, constitution_text=CONSTITUTION, template=template, **kw
    )


def free_port(n=2) -> int:
    """A port p with p..p+n-1 free on localhost (the ring backend takes one per rank)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for i in range(1, n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + i))
            return port
        except OSError:
            continue
    raise RuntimeError("no free ports")


def rank_env(**extra) -> dict:
    # Two ranks share this machine's cores: one BLAS thread each, or their spinning threads collide.
    return {**os.environ, "OPENBLAS_NUM_THREADS": "1", **extra}


def one_process(argv, log: Path, timeout=120, **env: str) -> None:
    """`python -m sami_mlx.train ARGV` with the ranks' environment (same BLAS threads, same rounding)
    and `env` added."""
    with open(log, "w") as out:
        subprocess.run(
            [sys.executable, "-m", "sami_mlx.train", *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=rank_env(**env),
            timeout=timeout,
            check=True,
        )


def launch(argv, log: Path, timeout=120, **env: str) -> str:
    """`mlx.launch -n 2 --backend ring -- python -m sami_mlx.train ARGV` (`env` added); returns its output.

    (mlx.launch exits 0 even when a rank fails: callers check the run directory.)
    """
    cmd = [
        str(LAUNCH),
        "-n",
        "2",
        "--backend",
        "ring",
        "--starting-port",
        str(free_port()),
        "--",
        sys.executable,
        "-m",
        "sami_mlx.train",
        *argv,
    ]
    with open(log, "w") as out:
        # A session of its own, so that a timeout ends the launcher's ranks too.
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=rank_env(**env),
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return log.read_text(errors="replace")


@contextlib.contextmanager
def ranks_running(argv, root: Path, env=({}, {})):
    """What mlx.launch does locally, one process per rank, so each gets its own environment and exit code."""
    port = free_port(len(env))
    hostfile = root / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(len(env))]))
    procs = []
    try:
        for rank, extra in enumerate(env):
            full = rank_env(MLX_HOSTFILE=str(hostfile), MLX_RANK=str(rank), **extra)
            with open(root / f"rank{rank}.log", "w") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "sami_mlx.train", *argv],
                        env=full,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def output(root: Path, rank: int) -> str:
    return (root / f"rank{rank}.log").read_text(errors="replace")


def adapters(run: Path) -> dict:
    return mx.load(str(run / "adapters.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(mx.abs(a[k] - b[k]).max().item() for k in a)


def run_files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())


# Loaded by every process of the reference runs: each process (by rank) writes down how many held-out
# groups the monitor scored and how many answers' log-probabilities it computed, call by call.
SHARES = """
import json, os
import sami_mlx.loop.drift as drift
import sami_mlx.loop.monitor as monitor

log = os.path.join(os.environ["TEST_SHARES"], f"rank{os.environ.get('MLX_RANK', '-')}.jsonl")
score, token_logprobs = monitor.Monitor.score, drift.token_logprobs

def record(kind, n):
    with open(log, "a") as f:
        f.write(json.dumps([kind, n]) + "\\n")

def scored(self, groups):
    record("groups", len(groups))
    return score(self, groups)

def logprobs(model, inputs, targets):
    record("answers", inputs.shape[0])
    return token_logprobs(model, inputs, targets)

monitor.Monitor.score, drift.token_logprobs = scored, logprobs
"""


@pytest.fixture(scope="module")
def reference(flags, tmp_path_factory):
    """The same run in one process and on two ranks; ROOT/shares holds what each process's monitor did."""
    root = tmp_path_factory.mktemp("dist")
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SHARES)
    for run in ("single", "dist"):
        (root / "shares" / run).mkdir(parents=True)
    env = {"PYTHONPATH": pythonpath(hook)}
    one_process(
        flags(REGULARISED, out=root / "single"), root / "single.log", **env, TEST_SHARES=str(root / "shares" / "single")
    )
    log = launch(
        flags(REGULARISED, out=root / "dist"), root / "launch.log", **env, TEST_SHARES=str(root / "shares" / "dist")
    )
    return root, log


def monitor_work(root: Path, run: str, who: str) -> dict[str, int]:
    """How many held-out groups and answers the monitor of `run`'s process `who` ('-' alone, else a
    rank) scored."""
    work = {"groups": 0, "answers": 0}
    for kind, n in read_jsonl(root / "shares" / run / f"rank{who}.jsonl"):
        work[kind] += n
    return work


def test_two_ranks_train_the_adapters_one_process_trains(reference):
    root, log = reference
    single, dist = root / "single", root / "dist"
    assert json.loads((dist / "state.json").read_text())["finished"], log[-3000:]
    assert "data-parallel over 2 ranks" in log
    # The ranks sampled disjoint shards; together they are exactly what one process sampled.
    for it in ("iter-01", "iter-02"):
        assert (dist / it / "samples.jsonl").read_bytes() == (single / it / "samples.jsonl").read_bytes()
    kept = [r["kept"] for it in ("iter-01", "iter-02") for r in read_jsonl(single / it / "samples.jsonl")]
    assert any(kept) and not all(kept)  # some groups were filtered out
    # Same steps, same losses (3 groups a step: 2 on rank 0, 1 on rank 1, weighted by count).
    steps = {
        run: [r for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "StepCompleted"] for run in (single, dist)
    }
    assert [r["global_step"] for r in steps[dist]] == [r["global_step"] for r in steps[single]] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(steps[single], steps[dist]):
        for key in ("loss", "row_accuracy", "column_accuracy", "grad_norm", "kl", "anchor_kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), key
        assert sum(b["scores"], []) == pytest.approx(sum(a["scores"], []), abs=1e-5)  # rank 0's first group
    assert steps[single][-1]["kl"] > 0 and steps[single][-1]["anchor_kl"] > 0
    # The ranks split the degeneration monitor's work (greedy answers, drift, held-out MI) and
    # measure what one process measures.
    probes = [json.loads((run / "monitor.json").read_text()) for run in (single, dist)]
    assert probes[0]["prompted"] == probes[1]["prompted"] and probes[0]["plain"] == probes[1]["plain"]
    assert probes[1]["base_nll"] == pytest.approx(probes[0]["base_nll"], rel=1e-5)
    assert probes[1]["base_mi"] == pytest.approx(probes[0]["base_mi"], abs=1e-5)
    checks = {
        run: [r for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "MonitorChecked"] for run in (single, dist)
    }
    assert len(checks[dist]) == len(checks[single]) >= 4
    for a, b in zip(checks[single], checks[dist]):
        for key in ("drift_prompted", "drift_plain", "heldout_mi", "mean_length", "distinct_2", "healthy"):
            assert b.get(key) == pytest.approx(a.get(key), rel=1e-5, abs=1e-5), key
    assert any(r.get("heldout_mi") is not None for r in checks[single])
    alone, ranks = monitor_work(root, "single", "-"), [monitor_work(root, "dist", r) for r in ("0", "1")]
    for kind in ("groups", "answers"):  # each rank did a part of the work, and together all of it
        assert ranks[0][kind] + ranks[1][kind] == alone[kind] and 0 < ranks[1][kind] <= ranks[0][kind] < alone[kind]
    a, b = adapters(single), adapters(dist)
    assert max_diff(a, b) < TOLERANCE
    assert max(mx.abs(v).max().item() for k, v in a.items() if "lora_b" in k) > 20 * TOLERANCE  # it trained
    # Only rank 0 wrote, and it wrote what one process writes.
    assert run_files(dist) == run_files(single)


def test_a_rank_whose_groups_were_all_filtered_still_takes_part(flags, tmp_path):
    """One query a step on two ranks: rank 1 samples the iteration's second slot, which is dropped
    here, and scores nothing in any step; it adds zeros to every sum and the run ends as one process's."""
    few = dict(iterations=1, queries_per_step=1)
    one_process(flags(few, out=tmp_path / "probe"), tmp_path / "probe.log")
    rows = read_jsonl(tmp_path / "probe" / "iter-01" / "samples.jsonl")
    assert [r["kept"] for r in rows] == [True, True]
    banned = rows[1]["responses"][0].strip()  # slot 1's first response: ban it to drop that group
    assert banned and not any(banned in t for t in rows[0]["responses"])

    one_process(flags(few, banned=[banned], out=tmp_path / "single"), tmp_path / "single.log")
    log = launch(flags(few, banned=[banned], out=tmp_path / "dist"), tmp_path / "launch.log")
    dist = tmp_path / "dist"
    assert json.loads((dist / "state.json").read_text())["finished"], log[-3000:]
    # The dropped group is replaced by the split's next query (sampled by rank 0, the wave's only slot).
    assert [r["kept"] for r in read_jsonl(dist / "iter-01" / "samples.jsonl")] == [True, False, True]
    assert max_diff(adapters(tmp_path / "single"), adapters(dist)) < TOLERANCE


def test_a_killed_rank_ends_the_other_with_a_message_and_the_run_resumes(flags, reference, tmp_path):
    root, _ = reference
    run = tmp_path / "run"
    started = time.perf_counter()
    argv = flags(REGULARISED, out=run)  # resumed, it must end as the reference run did
    with ranks_running(argv, tmp_path, env=({}, {"SAMI_MLX_KILL_AT": "update:3"})) as procs:
        codes = [p.wait(timeout=120) for p in procs]
    assert codes == [RankLost.exit_code, -signal.SIGKILL], output(tmp_path, 0)[-3000:]
    assert time.perf_counter() - started < 90
    err = output(tmp_path, 0)
    assert "error: rank 0: lost contact with the other ranks" in err and "iteration 2, step" in err, err[-3000:]
    assert "--resume RUN" in err
    state = json.loads((run / "state.json").read_text())
    assert not state["finished"] and state["global_step"] in (2, 3)

    log = launch(["--resume", str(run)], tmp_path / "resume.log")
    assert json.loads((run / "state.json").read_text())["finished"], log[-3000:]
    got, want = adapters(run), adapters(root / "dist")
    assert all(mx.array_equal(got[k], want[k]).item() for k in got), "resumed run differs from the uninterrupted one"
    steps = [r["global_step"] for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "StepCompleted"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_frozen_rank_is_ended_by_the_watchdog(flags, tmp_path):
    """SIGSTOP keeps the peer's connection open, so only the timeout can notice it."""
    run = tmp_path / "run"
    argv = [*flags(iterations=1, steps=200, queries_per_step=1, out=run), "--rank-timeout", "2"]
    with ranks_running(argv, tmp_path) as procs:
        deadline = time.monotonic() + 120
        while not any(r["event"] == "StepCompleted" for r in read_jsonl(run / "metrics.jsonl")):
            assert time.monotonic() < deadline and procs[0].poll() is None, output(tmp_path, 0)[-3000:]
            time.sleep(0.02)
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        assert procs[0].wait(timeout=60) == RankLost.exit_code == 3
        assert time.monotonic() - stopped < 30  # 2 s plus twice a step's own work
    err = output(tmp_path, 0)
    assert "error: rank 0: waited" in err and "for the other ranks while" in err, err[-3000:]
    assert not json.loads((run / "state.json").read_text())["finished"]


def test_all_groups_degenerate_stops_every_rank_alike(tiny_flags, tmp_path):
    """The fixture constitution ends every prompt alike, so greedy responses never differ."""
    argv = tiny_flags(temperature=0.0, variants="paper", out=tmp_path / "run")
    with ranks_running(argv, tmp_path) as procs:
        codes = [p.wait(timeout=120) for p in procs]
    assert codes == [1, 1]
    for rank in (0, 1):
        assert re.search(r"all \d+ sampled groups were degenerate", output(tmp_path, rank))
    assert "error: rank 1: iteration 1: all" in output(tmp_path, 1)
    assert not (tmp_path / "run" / "state.json").exists()


SUMMARY_RANK = """
import json, os, sys
from pathlib import Path
from sami_mlx.config import TrainConfig
from sami_mlx.loop.trainer import train

result = train(TrainConfig(**json.loads(Path(sys.argv[1]).read_text())))
Path(sys.argv[2]).joinpath(f"summary{os.environ['MLX_RANK']}.json").write_text(json.dumps(result.iterations))
"""


def test_every_rank_returns_the_same_iteration_summaries(tiny_config, tmp_path, monkeypatch):
    """Rank 1 writes no metrics.jsonl, yet it averages the iteration's steps as rank 0 does: the
    means come from the steps themselves, not from the log."""
    template = tmp_path / "t.txt"
    template.write_text(TEMPLATE)
    cfg = tiny_config(DISTRIBUTED, REGULARISED, constitution_text=CONSTITUTION, template=template, out=tmp_path / "run")
    (tmp_path / "cfg.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    (tmp_path / "rank.py").write_text(SUMMARY_RANK)
    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    argv = [sys.executable, str(tmp_path / "rank.py"), str(tmp_path / "cfg.json"), str(tmp_path)]
    assert run_local_ranks(argv, 2, tmp_path) == 0, (tmp_path / "rank1.log").read_text()[-2000:]
    first, second = (json.loads((tmp_path / f"summary{r}.json").read_text()) for r in (0, 1))
    assert [s["iteration"] for s in first] == [1, 2]
    assert all(math.isfinite(s[k]) for s in first for k in ("loss", "mi_bound", "row_accuracy", "column_accuracy"))
    assert second == first
    # And they are the means of the steps rank 0 logged.
    steps = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["event"] == "StepCompleted"]
    for summary in first:
        losses = [r["loss"] for r in steps if r["iteration"] == summary["iteration"]]
        assert summary["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-12)

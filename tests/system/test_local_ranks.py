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
from helpers import TINY_RECIPE, pythonpath, tiny_demo_preset

from sami_mlx.cli.local_ranks import run_local_ranks
from sami_mlx.cli.main import main
from sami_mlx.loop.distributed import RankLost
from sami_mlx.machine import local_cores

ROOT = Path(__file__).resolve().parents[2]


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
    threads = max(1, local_cores() // 2)
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


def sleeping_ranks(tmp_path: Path) -> subprocess.Popen:
    """A process (in a session of its own, like a terminal's job) running two ranks that sleep; each rank
    writes RANKr.pid with its pid and whether it ignores Ctrl-C."""
    ranks = script(
        tmp_path,
        """
        import os, signal, time
        from pathlib import Path
        ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        Path(os.environ["MLX_HOSTFILE"]).parent.parent.joinpath(f"rank{os.environ['MLX_RANK']}.pid").write_text(
            f"{os.getpid()} {ignored}"
        )
        time.sleep(600)
        """,
    )
    supervisor = tmp_path / "supervise.py"
    supervisor.write_text(
        f"import sys; from pathlib import Path; from sami_mlx.cli.local_ranks import run_local_ranks\n"
        f"sys.exit(run_local_ranks({ranks!r}, 2, Path({str(tmp_path)!r})))\n"
    )
    env = {**os.environ, "PYTHONPATH": pythonpath(), "TMPDIR": str(tmp_path)}
    return subprocess.Popen(
        [sys.executable, str(supervisor)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # Ctrl-C's default action: a test suite started in the background inherits SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def rank_pids(tmp_path: Path, proc: subprocess.Popen) -> list[tuple[int, str]]:
    pid_files = [tmp_path / "rank0.pid", tmp_path / "rank1.pid"]
    deadline = time.monotonic() + 60
    while not all(f.exists() and f.read_text() for f in pid_files):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    return [(int(pid), ignored) for pid, ignored in (f.read_text().split() for f in pid_files)]


def test_ctrl_c_ends_every_rank_within_seconds(tmp_path):
    proc = sleeping_ranks(tmp_path)
    ranks = rank_pids(tmp_path, proc)
    assert [ignored for _, ignored in ranks] == ["True", "True"]  # only the supervisor answers Ctrl-C
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal sends its foreground job
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.monotonic() - start < 5
    assert err.strip().splitlines()[-1] == "interrupted"
    assert not any(alive(pid) for pid, _ in ranks)


def test_sigterm_ends_every_rank_too(tmp_path):
    proc = sleeping_ranks(tmp_path)
    ranks = rank_pids(tmp_path, proc)
    proc.terminate()
    proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert not any(alive(pid) for pid, _ in ranks)


LOSE_A_RANK = """
import sys
from sami_mlx.cli.guard import guarded
from sami_mlx.errors import SamiError
from sami_mlx.loop.distributed import Ranks

def run():
    ranks = Ranks.world()
    if ranks.rank == {failing}:
        raise SamiError("rank {failing} found no inputs")
    ranks.barrier("waiting for rank {failing}")  # this rank loses the other one here
    return 0

sys.exit(guarded(run))
"""


@pytest.mark.parametrize("failing", [1, 0])
def test_a_rank_lost_at_a_collective_is_not_blamed_for_the_rank_that_failed(tmp_path, capfd, monkeypatch, failing):
    argv = script(tmp_path, LOSE_A_RANK.format(failing=failing))
    monkeypatch.setenv("PYTHONPATH", pythonpath())
    start = time.monotonic()
    assert run_local_ranks(argv, 2, tmp_path) == 2 and time.monotonic() - start < 30
    err = capfd.readouterr().err.strip()
    if failing == 1:  # rank 0 stops first, on losing rank 1: the supervisor names rank 1 and its error
        assert "rank 0: lost contact with the other ranks while waiting for rank 1" in err
        last = "error: rank 1 stopped (exit code 2): error: rank 1 found no inputs; its output is in"
        assert err.splitlines()[-1].startswith(last)
    else:  # rank 0's own error is the last word; rank 1 only lost it
        assert err.splitlines()[-1] == "error: rank 0 found no inputs"
        assert "lost contact with the other ranks while waiting for rank 0 (" in (tmp_path / "rank1.log").read_text()
        assert "rank 1 stopped" not in err
    assert RankLost.exit_code not in (0, 2)


def test_a_late_start_is_waited_for_but_a_later_silence_is_not(tmp_path, capfd, monkeypatch):
    """--rank-timeout is for a frozen peer: ranks starting seconds apart (a busy machine, a slow disk)
    still meet; once they have, a rank silent for longer than the timeout ends the others."""
    argv = script(
        tmp_path,
        """
        import sys, time
        from sami_mlx.cli.guard import guarded
        from sami_mlx.loop.distributed import Ranks

        def run():
            import os
            if os.environ["MLX_RANK"] == "1":
                time.sleep(4)  # starts 4 s late: twice the timeout
            ranks = Ranks.world(timeout=2)
            ranks.barrier("starting")
            print(f"rank {ranks.rank} met the other")
            if ranks.rank == 1:
                time.sleep(30)  # silent for far longer than the timeout
            ranks.barrier("going on")
            return 0

        sys.exit(guarded(run))
        """,
    )
    monkeypatch.setenv("PYTHONPATH", pythonpath())
    start = time.monotonic()
    assert run_local_ranks(argv, 2, tmp_path) == RankLost.exit_code and time.monotonic() - start < 25
    out, err = capfd.readouterr()
    assert "rank 0 met the other" in out and "rank 1 met the other" in (tmp_path / "rank1.log").read_text()
    assert "error: rank 0: waited 2s for the other ranks while going on" in err


@pytest.mark.parametrize("ranks, batch_size", [(2, 16), (3, 2)])  # (3, 2): one rank has no rows to add
def test_ranks_build_the_toy_model_one_process_builds(tmp_path, monkeypatch, ranks, batch_size):
    from sami_mlx.toy.pretrain import ensure_toy_model, toy_model_dir

    recipe = {**TINY_RECIPE, "batch_size": batch_size}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
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
    monkeypatch.setenv("PYTHONPATH", pythonpath())
    assert run_local_ranks(argv, ranks, tmp_path) == 0
    two = toy_model_dir(recipe)
    last_losses = json.loads((tmp_path / f"rank{ranks - 1}.log").read_text().split("losses ")[-1])
    # One model in the cache, no half-built copy left beside it.
    assert [p.name for p in two.parent.iterdir()] == [two.name]

    monkeypatch.setenv("SAMI_MLX_CACHE", str(tmp_path / "one"))
    losses: list[float] = []
    one = ensure_toy_model(recipe, lambda n, total, loss: losses.append(loss))
    assert one.name == two.name  # the same cache key: the same model, up to rounding
    # Every rank reports the whole batch's loss, and it is the one process's loss.
    assert last_losses == pytest.approx(losses, rel=1e-4) and len(losses) == 2
    a, b = mx.load(str(one / "model.safetensors")), mx.load(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert mx.allclose(a[k], b[k], rtol=1e-3, atol=1e-4).item(), k
    if ranks == 2:
        # Two shares of every batch, summed in either order: one process with the BLAS threads each rank
        # had (OpenBLAS rounds differently with more threads) builds the very same bytes.
        env = {**os.environ, "SAMI_MLX_CACHE": str(tmp_path / "one-thread"), "OPENBLAS_NUM_THREADS": "1"}
        subprocess.run(argv, env={**env, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True, timeout=120)
        same = (tmp_path / "one-thread" / "models" / one.name / "model.safetensors").read_bytes()
        assert same == (two / "model.safetensors").read_bytes()
    assert (one / "tokenizer.json").read_text() == (two / "tokenizer.json").read_text()


# Loaded by every Python process started with this folder on PYTHONPATH: the demo's ranks then run
# the tiny world, and each says which model it measured (with adapters: the trained one).
SITECUSTOMIZE = """
import json, os
from mlx.utils import tree_flatten
import sami_mlx.toy.demo as demo

PRESET = json.loads(os.environ["TEST_DEMO_PRESET"])
demo.load_preset = lambda name="toy-world": PRESET
measure = demo.heldout_perplexity

def heldout_perplexity(model, tokenizer, texts):
    trained = any("lora" in k for k, _ in tree_flatten(model.parameters()))
    print(f"rank {os.environ.get('MLX_RANK', '-')} measured the {'trained' if trained else 'base'} model")
    return measure(model, tokenizer, texts)

demo.heldout_perplexity = heldout_perplexity
"""


def demo_on_two_ranks(tmp_path: Path, sitecustomize: str, **env: str) -> tuple[Path, subprocess.CompletedProcess]:
    """`sami-mlx demo --ranks 2` into TMP/run, as a user starts it, with `sitecustomize` loaded by every
    process (the ranks too) and `env` added; (the run directory, the finished process)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(sitecustomize)
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "sami_mlx.cli.main", "demo", "--out", str(run), "--ranks", "2"],
        env={**os.environ, "PYTHONPATH": pythonpath(hook), "SAMI_MLX_CACHE": str(tmp_path / "cache"), **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return run, proc


def test_sami_mlx_demo_runs_on_two_local_ranks(tmp_path, monkeypatch):
    from sami_mlx.toy.demo import run_demo

    preset = tiny_demo_preset()
    preset["demo"]["llm_judge"] = {"max_tokens": 4}  # the model as judge: each rank judges half the pairs
    run, proc = demo_on_two_ranks(tmp_path, SITECUSTOMIZE, TEST_DEMO_PRESET=json.dumps(preset))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SAMI on the toy principles world" in proc.stdout and "win rate vs base" in proc.stdout
    # Rank 1 measured the base model while rank 0 measured the trained one; only rank 0 printed the table.
    assert "rank 0 measured the trained model" in proc.stdout and "base model" not in proc.stdout.split("SAMI on")[0]
    rank1 = (run / "rank1.log").read_text()
    assert "rank 1 measured the base model" in rank1 and "SAMI on the toy" not in rank1
    report = json.loads((run / "demo.json").read_text())
    assert report["n_eval"] == 2 * 4 and (run / "iter-01" / "adapters.safetensors").exists()
    # What reached rank 0 is exactly what one process measures of the same base model (each
    # evaluation seeds its own sampling).
    monkeypatch.setenv("SAMI_MLX_CACHE", str(tmp_path / "cache"))
    one = run_demo(tmp_path / "one", preset)
    assert report["base_adherence"] == one["base_adherence"]
    assert report["ppl_base"] == pytest.approx(one["ppl_base"], rel=1e-12)
    assert report["greedy_adherence"]["base"] == one["greedy_adherence"]["base"]
    assert report["heldout"]["base_adherence"] == one["heldout"]["base_adherence"]
    assert [e["base"] for e in report["examples"]] == [e["base"] for e in one["examples"]]
    # Both ranks took part in the judge (rank 1 judged its share of the pairs, or neither rank would
    # have finished); its verdicts on the trained model's replies are not one process's to compare.
    assert report["llm_judge"]["n"] == 2 and 0 <= report["llm_judge"]["parsed"] <= 2


# The real demo's greedy passes outside training, on `Ranks.world()` (or one process with an argument):
# the plain answers and the judge's replies, with the number of prompts each call to generate got.
SPLIT = """
import json, sys
import sami_mlx.evaluation.verdicts as verdicts
import sami_mlx.loop.rollout as rollout
from sami_mlx import styleworld
from sami_mlx.loop.distributed import Ranks
from sami_mlx.model import load_model
from sami_mlx.toy.demo import llm_judge

model_dir, out = sys.argv[1], sys.argv[2]
ranks = Ranks() if len(sys.argv) > 3 else Ranks.world()
prompts, replies = [], []
generate, parse = rollout.generate_batch, verdicts.parse_verdict
rollout.generate_batch = lambda model, tok, ids, *a, **k: prompts.append(len(ids)) or generate(model, tok, ids, *a, **k)
verdicts.parse_verdict = lambda text: replies.append(text) or parse(text)
model, tokenizer = load_model(model_dir)[:2]
plain = styleworld.plain_answers(model, tokenizer, 5, 7, 6, ranks)
pairs = [(q, a, a[::-1]) for q, a in plain]
judged = llm_judge(model_dir, styleworld.sub_constitution(["brief", "list"]), pairs, 3, 6, ranks)
with open(f"{out}/rank{ranks.rank}.json", "w") as f:
    json.dump({"plain": plain, "replies": replies, "judged": judged, "prompts": prompts}, f)
"""


def test_two_ranks_split_the_plain_answers_and_the_judge_and_share_what_one_process_writes(tiny_model, tmp_path):
    argv = [*script(tmp_path, SPLIT), str(tiny_model), str(tmp_path)]
    assert run_local_ranks(argv, 2, tmp_path) == 0, (tmp_path / "rank1.log").read_text()[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    alone = tmp_path / "alone"
    alone.mkdir()
    threads = str(max(1, local_cores() // 2))  # the BLAS threads each rank had
    env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
    proc = subprocess.run([*argv[:-1], str(alone), "one"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one = json.loads((alone / "rank0.json").read_text())
    # Five plain questions and five pairs: rank 0 wrote and judged three of each, rank 1 two.
    assert one["prompts"] == [5, 5] and ranks[0]["prompts"] == [3, 3] and ranks[1]["prompts"] == [2, 2]
    for rank in ranks:  # every rank holds all of it, in the one process's order
        assert rank["plain"] == one["plain"] and len({a for _, a in one["plain"]}) > 1
        assert rank["replies"] == one["replies"] and rank["judged"] == one["judged"]


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


def test_a_demo_rank_that_loses_the_other_says_what_to_do_without_resume_advice(tmp_path):
    """The engine's lost-rank line ends with advice: the trainer's is to resume, which the demo cannot."""
    rank_0_fails = """
import os
import sami_mlx.toy.demo as demo
from sami_mlx.errors import SamiError
build = demo.ensure_toy_model

def ensure_toy_model(*args, **kwargs):
    if os.environ.get("MLX_RANK") == "0":
        raise SamiError("rank 0 could not build the model")
    return build(*args, **kwargs)

demo.ensure_toy_model = ensure_toy_model
"""
    run, proc = demo_on_two_ranks(tmp_path, rank_0_fails)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-2:] == [
        "error: rank 0 could not build the model",
        "(`sami-mlx demo --ranks 1` runs the demo in one process)",
    ], proc.stderr[-2000:]
    lost = (run / "rank1.log").read_text().strip().splitlines()[-1]
    assert lost.startswith("error: rank 1: lost contact with the other ranks while")
    assert lost.endswith("; start the demo again (it does not resume)") and "--resume" not in lost


@pytest.mark.parametrize(
    "files, cores",
    [
        ({"cpu.max": "100000 100000\n"}, 1),  # docker --cpus=1 (cgroup v2)
        ({"cpu.max": "150000 100000\n"}, 1),  # 1.5 cores' time: one whole core
        ({"cpu.max": "max 100000\n"}, None),  # no limit
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1, half a core
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, no limit
        ({}, None),  # no cgroup files at all (a Mac)
    ],
)
def test_cores_are_capped_by_a_containers_cpu_quota(tmp_path, monkeypatch, files, cores):
    import sami_mlx.machine as machine

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(machine, "CPU_QUOTA_FILES", (tmp_path / "cpu.max", tmp_path / "cpu/cpu.cfs_quota_us"))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert local_cores() == (4 if cores is None else cores)

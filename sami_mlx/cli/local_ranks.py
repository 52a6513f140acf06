"""Run a command as several ranks of one group on this machine, the way `mlx.launch --backend ring`
does, and supervise them: what `sami-mlx demo` uses to train on two local ranks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from sami_mlx.loop.distributed import RankLost
from sami_mlx.machine import local_cores


def run_local_ranks(argv: Sequence[str], n: int, log_dir: Path, poll: float = 0.2) -> int:
    """Run the command `argv` (one that joins `Ranks.world()`) as `n` ranks of one group on this machine,
    the way `mlx.launch --backend ring` does, and return rank 0's exit code.

    Rank 0 writes to this terminal; rank r > 0 to LOG_DIR/rank{r}.log. mlx.launch relays every rank's
    output through a polling loop that kept more than a core busy on a 2-core machine (a SAMI step
    took 2.2 s on two ranks against 1.15 s with the ranks started directly). Each rank gets an equal
    share of the cores for its BLAS threads. The ranks ignore Ctrl-C: this process answers it (and
    SIGTERM) by ending them all at once, so that none reports the others as lost. When a rank other
    than 0 fails, the others are ended too (none waits for it at a collective until its timeout) and
    its exit code is returned with its last line, the cause, even if rank 0 stopped first on losing it
    (a rank that only lost another exits with RankLost's code).
    """
    threads = str(max(1, local_cores() // n))
    ports = _free_ports(n)
    procs: list[subprocess.Popen] = []
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            hostfile = Path(tmp) / "hosts.json"
            hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in ports]))
            # Ignored signals stay ignored across exec: the ranks start with Ctrl-C ignored.
            ctrl_c = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                for rank in range(n):
                    env = {
                        **os.environ,
                        "MLX_HOSTFILE": str(hostfile),
                        "MLX_RANK": str(rank),
                        "OPENBLAS_NUM_THREADS": threads,
                        "OMP_NUM_THREADS": threads,
                    }
                    if rank == 0:
                        procs.append(subprocess.Popen(list(argv), env=env))
                        continue
                    with open(log_dir / f"rank{rank}.log", "w") as log:
                        procs.append(
                            subprocess.Popen(
                                list(argv), env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                            )
                        )
            finally:
                signal.signal(signal.SIGINT, ctrl_c)
            while True:
                # A rank > 0 that failed on its own (not by losing another) is the cause: name it.
                failed = [(r, p.returncode) for r, p in enumerate(procs) if r and _failed_itself(p.poll())]
                if failed:
                    rank, code = failed[0]
                    _end(procs, grace=0.0)
                    log_path = log_dir / f"rank{rank}.log"
                    last = _last_line(log_path)
                    print(
                        f"\nerror: rank {rank} stopped (exit code {_exit_code(code)}){': ' + last if last else ''}; "
                        f"its output is in {log_path}",
                        file=sys.stderr,
                    )
                    return _exit_code(code)
                if (code := procs[0].poll()) is not None:
                    if code != 0:  # it may have stopped on losing another rank: name that one if so
                        _end(procs[1:], grace=1.0, kill=False)
                        if any(_failed_itself(p.returncode) for p in procs[1:]):
                            continue
                    _end(procs[1:], grace=10.0)
                    return _exit_code(code)
                time.sleep(poll)
    except KeyboardInterrupt:
        _end(procs, grace=0.0)
        print("\ninterrupted", file=sys.stderr)
        return 130
    except _Terminated:
        _end(procs, grace=0.0)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
        _end(procs, grace=0.0)


class _Terminated(Exception):
    """SIGTERM reached the process that started the ranks."""


def _terminate(signum, frame) -> None:
    raise _Terminated


def _failed_itself(code: int | None) -> bool:
    """A rank's exit code says it failed, and not because it lost another rank."""
    return code not in (None, 0, RankLost.exit_code)


def _exit_code(code: int) -> int:
    """A child's exit status as a shell reports it (killed by signal k: 128 + k)."""
    return 128 - code if code < 0 else code


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on localhost (held together while chosen, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _end(procs: Sequence[subprocess.Popen], grace: float, kill: bool = True) -> None:
    """Wait up to `grace` seconds for the processes to finish, then (with `kill`) kill those still running."""
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if kill:
                p.kill()
                p.wait()


def _last_line(path: Path) -> str:
    """The last non-empty line of a rank's log (its error, usually), without progress-bar redraws."""
    try:
        lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")

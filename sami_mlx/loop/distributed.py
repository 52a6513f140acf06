"""Data-parallel SAMI over MLX's distributed engine: which rank does what, and the few collectives.

Launched with `mlx.launch -n 2 --backend ring -- sami-mlx train ...` (or `--hostfile` for several
Macs), every rank runs the same loop on the same schedule; `Ranks` is its view of the group. With
one process (no launcher) every method is a no-op that returns its input, so a single-process run
computes exactly what it computed before distributed training existed.

A rank that dies must not leave the others waiting forever. Two guards cover that:
- a collective that fails because a peer's connection closed (the usual case: a crash, a kill,
  Ctrl-C) becomes `RankLost`, one line that names the step;
- a watchdog ends a rank that has waited at a collective longer than `timeout` seconds plus twice
  the time it spent on its own share since the previous collective (so a slower Mac is waited for,
  a silent network or a frozen peer is not). The blocked thread cannot raise, so the watchdog
  prints its one line and exits the process: the only place the engine writes to stderr itself.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from sami_mlx.errors import RunAborted, SamiError

DEFAULT_TIMEOUT = 300.0
# Until the ranks have met once, a rank waits at least this long: starting Python and loading a model
# take seconds more on one rank than another (a busy machine, a slower disk), which is not a frozen peer.
STARTUP_TIMEOUT = 60.0
# What a user does after a lost rank ended `sami-mlx train` (a command of its own may say otherwise).
RESUME_ADVICE = (
    "the run directory keeps the last completed step: resume with the same launch command and --resume RUN "
    "(raise --rank-timeout if a rank is just slow)"
)


class RankLost(RunAborted):
    """A collective failed: another rank stopped, crashed or lost its connection. Its exit code sets a
    rank that only lost another apart from the rank that failed first."""

    exit_code = 3


class Ranks:
    """This process's place in the group (`rank` of `size`) and the collectives the loop uses."""

    def __init__(
        self, group: mx.distributed.Group | None = None, timeout: float = DEFAULT_TIMEOUT, advice: str = RESUME_ADVICE
    ):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1
        self.timeout = timeout
        self.advice = advice  # the end of the line a lost rank ends this one with: what to do next
        self.at = ""  # where the loop is, for messages: "iteration 2, step 3"
        self._since = time.monotonic()  # end of the last collective: the start of this rank's own work
        self._met = False  # whether a collective has completed yet (before: STARTUP_TIMEOUT at least)

    @classmethod
    def world(cls, timeout: float = DEFAULT_TIMEOUT, advice: str = RESUME_ADVICE) -> Ranks:
        """The launcher's group (mx.distributed.init), or a single rank when started without one."""
        if not launched():
            return cls(None, timeout, advice)
        # init blocks until every rank has connected: a rank that never starts would hang it.
        rank = os.environ.get("MLX_RANK", "?")
        with _watchdog(
            max(timeout, STARTUP_TIMEOUT),
            f"rank {rank}: the other ranks did not connect within {{:.0f}}s; check that every "
            "host runs the same command and that the hostfile's addresses reach each other",
        ):
            try:
                group = mx.distributed.init()
            except RuntimeError as e:
                raise SamiError(
                    f"rank {rank}: could not join the other ranks ({e}); check the hostfile and "
                    "the --backend given to mlx.launch"
                ) from None
        return cls(group if group.size() > 1 else None, timeout, advice)

    @property
    def primary(self) -> bool:
        """Rank 0 writes the run directory and shows progress; the others only compute."""
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's share of n slots: every size-th one, starting at its rank."""
        return range(self.rank, n, self.size)

    def seed(self, seed: int) -> int:
        """A random seed of this rank's own; rank 0 keeps the single-process seed."""
        if self.rank == 0:
            return seed
        return int.from_bytes(
            np.random.SeedSequence([seed, self.rank]).generate_state(1, np.uint32).tobytes(), "little"
        )

    # ---- collectives ----------------------------------------------------------------------

    def run(self, what: str, compute: Callable[[], mx.array | Sequence | dict]):
        """Build a collective with `compute`, evaluate it under the watchdog; a lost peer raises RankLost."""
        timeout = self.timeout if self._met else max(self.timeout, STARTUP_TIMEOUT)
        budget = timeout + 2 * (time.monotonic() - self._since)
        what = f"{what} ({self.at})" if self.at else what
        message = (
            f"rank {self.rank}: waited {{:.0f}}s for the other ranks while {what}; one of them has "
            f"stopped, frozen or lost its connection. Ending this rank; {self.advice}"
        )
        try:
            with _watchdog(budget, message):
                result = compute()
                mx.eval(result)
        except RuntimeError as e:
            raise RankLost(
                f"rank {self.rank}: lost contact with the other ranks while {what} ({e}); another rank stopped "
                f"or crashed, see its output; {self.advice}"
            ) from None
        self._since, self._met = time.monotonic(), True
        return result

    def barrier(self, what: str) -> None:
        """Wait until every rank got here (a one-number all_sum)."""
        if self.size > 1:
            self.run(what, lambda: mx.distributed.all_sum(mx.array(1), group=self.group))

    def sum_gradients(self, grads: dict, what: str) -> dict:
        """Sum of every rank's gradient tree, through nn.average_gradients (one all_sum per 32 MB).

        Each rank weights its gradient by its groups' share of the global batch, so the sum is the
        global mean; average_gradients divides by the rank count, hence the scaling first.
        """
        if self.size == 1:
            return grads
        scaled = tree_map(lambda g: g * self.size, grads)
        return self.run(what, lambda: nn.average_gradients(scaled, group=self.group))

    def gather(self, values: Sequence[float], what: str) -> list[list[float]]:
        """Every rank's row of numbers, in rank order (float32 on the wire)."""
        if self.size == 1:
            return [list(values)]
        rows = self.run(
            what, lambda: mx.distributed.all_gather(mx.array([list(values)], dtype=mx.float32), group=self.group)
        )
        return rows.tolist()

    def any(self, flag: bool, what: str) -> bool:
        """True on every rank if it is True on one (a stop request seen by rank 0 reaches all)."""
        if self.size == 1:
            return flag
        return bool(self.run(what, lambda: mx.distributed.all_sum(mx.array(int(flag)), group=self.group)).item())

    def sum(self, values: Sequence[float], what: str) -> list[float]:
        """Element-wise sum over ranks."""
        if self.size == 1:
            return list(values)
        return [sum(col) for col in zip(*self.gather(values, what))]

    def gather_lists(self, rows: Sequence[Sequence[int]], what: str) -> list[list[list[int]]]:
        """Every rank's ragged lists of ints, in rank order (padded into one array for the wire)."""
        if self.size == 1:
            return [[list(r) for r in rows]]
        widest = max((len(r) for r in rows), default=0)
        shape = self.run(
            what, lambda: mx.distributed.all_gather(mx.array([[len(rows), widest]], dtype=mx.int32), group=self.group)
        ).tolist()
        count, width = max(n for n, _ in shape), max(w for _, w in shape)
        buf = np.zeros((max(count, 1), width + 1), dtype=np.int32)
        for i, r in enumerate(rows):
            buf[i, 0] = len(r)
            buf[i, 1 : 1 + len(r)] = r
        table = np.array(self.run(what, lambda: mx.distributed.all_gather(mx.array(buf), group=self.group)))
        table = table.reshape(self.size, max(count, 1), width + 1)
        return [[table[k, i, 1 : 1 + table[k, i, 0]].tolist() for i in range(n)] for k, (n, _) in enumerate(shape)]

    def gather_texts(self, mine: Sequence[str], n: int, what: str) -> list[str]:
        """The texts of all `n` slots, in slot order, on every rank: each rank holds those of its
        shard (`shard(n)`), in order."""
        assert len(mine) == len(self.shard(n)), f"{len(mine)} texts for a shard of {len(self.shard(n))} slots"
        per_rank = self.gather_lists([list(t.encode()) for t in mine], what)
        return [bytes(per_rank[pos % self.size][pos // self.size]).decode() for pos in range(n)]


def launched() -> bool:
    """Whether a launcher (mlx.launch, mpirun) started this process as one rank of several."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile:  # `mlx.launch -n 1` passes an empty hostfile: one rank
        try:
            return bool(Path(hostfile).read_text().strip())
        except OSError:
            return True  # let init say what is wrong with it
    keys = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_JACCL_COORDINATOR", "MLX_WORLD_SIZE")
    return any(os.environ.get(k) for k in keys)


class _watchdog:
    """Exit the process with `message` (formatted with the seconds waited) if the block outlasts `seconds`."""

    def __init__(self, seconds: float, message: str):
        self.seconds, self.message = seconds, message
        self.timer: threading.Timer | None = None

    def __enter__(self) -> _watchdog:
        self.timer = threading.Timer(self.seconds, self._fire)
        self.timer.daemon = True
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def _fire(self) -> None:
        # A newline first: a progress bar may be holding the current line.
        print(f"\nerror: {self.message.format(self.seconds)}", file=sys.stderr, flush=True)
        os._exit(RankLost.exit_code)

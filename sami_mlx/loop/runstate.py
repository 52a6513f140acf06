"""What a run directory remembers between processes: the schedule position, the step state it resumes
from (adapters and optimizer state after each optimizer step, in RUN/checkpoints/), a lock.

"Checkpoints" elsewhere (sami_mlx.checkpoints) are the per-iteration adapters people chat with and
evaluate; the step state is only for --resume."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from sami_mlx.errors import SamiError
from sami_mlx.fileio import atomic_save_safetensors, atomic_write_json
from sami_mlx.loop.adapters import adapter_weights, set_adapter_weights
from sami_mlx.loop.faults import fault_point

STATE_VERSION = 1


@dataclass
class RunState:
    """The schedule position; `checkpoint` names the folder holding the step state (adapters and optimizer state)."""

    iteration: int = 0  # 0-based: the iteration in progress, or next to start
    phase: str = "sampling"  # "sampling" (its data not drawn yet) or "training"
    step: int = 0  # optimizer steps done in this iteration
    global_step: int = 0
    base_ppl: float | None = None
    checkpoint: str | None = None
    saves: int = 0
    skipped_steps: int = 0
    iterations: list = field(default_factory=list)  # summaries of completed iterations
    # The figures of this iteration's trained steps, which its summary averages (so that a resumed
    # run, and every rank, averages the same steps).
    step_scores: list = field(default_factory=list)
    finished: bool = False
    split_offsets: list = field(default_factory=lambda: [0, 0])  # queries used so far, per query split
    healthy: dict | None = None  # the last check the monitor passed: {"iteration", "step"}
    kept: dict | None = None  # what RUN/adapters.safetensors holds, and why
    stopped: str = ""  # why the monitor stopped the run ("" if it did not)
    version: int = STATE_VERSION

    @property
    def completed_iterations(self) -> int:
        return len(self.iterations)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "completed_iterations": self.completed_iterations}

    @classmethod
    def load(cls, path: Path) -> RunState:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            data.pop("completed_iterations", None)
            return cls(**data)
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise SamiError(f"{path}: unreadable run state ({type(e).__name__}); the run cannot be resumed") from None


def save_step_state(out: Path, state: RunState, model: nn.Module, optimizer: optim.Optimizer) -> None:
    """Write adapters + optimizer state to a new folder, point state.json at it, drop older folders.

    A kill at any moment leaves state.json naming a complete step state.
    """
    state.saves += 1
    name = f"checkpoints/{state.saves:06d}"
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(folder / "adapters.safetensors", adapter_weights(model))
    fault_point("checkpoint")
    atomic_save_safetensors(folder / "optimizer.safetensors", dict(tree_flatten(optimizer.state)))
    state.checkpoint = name
    atomic_write_json(out / "state.json", state.to_dict())
    fault_point("checkpoint-saved")
    for old in (out / "checkpoints").iterdir():
        if old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)


def load_step_state(out: Path, state: RunState, model: nn.Module, optimizer: optim.Optimizer) -> None:
    """Restore adapters and optimizer state saved by save_step_state (`state.checkpoint` names them)."""
    assert state.checkpoint is not None, "load_step_state needs a state that names a step state"
    folder = out / state.checkpoint
    try:
        # A .safetensors file loads as a dict of arrays; mx.load's annotation covers every format.
        adapters = cast("dict[str, mx.array]", mx.load(str(folder / "adapters.safetensors")))
        opt_state = cast("dict[str, mx.array]", mx.load(str(folder / "optimizer.safetensors")))
    except Exception as e:
        raise SamiError(f"{folder}: step state unreadable ({str(e)[:80]}); the run cannot be resumed") from None
    expected = adapter_weights(model)
    if adapters.keys() != expected.keys() or any(adapters[k].shape != expected[k].shape for k in adapters):
        raise SamiError(
            f"{folder}: adapters do not match this model and LoRA settings; resume with the run's own config"
        )
    set_adapter_weights(model, adapters)
    optimizer.state = tree_unflatten(list(opt_state.items()))
    optimizer.init(model.trainable_parameters())


class RunLock:
    """One writer per run directory: RUN/.lock holds the writer's PID; a dead writer's lock is taken over."""

    def __init__(self, out: Path):
        self.path = out / ".lock"

    def __enter__(self) -> RunLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = _read_pid(self.path)
                if holder is not None and _alive(holder):
                    raise SamiError(
                        f"{self.path.parent}: another process (PID {holder}) is writing this run; "
                        "wait for it or stop it first"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its writer is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise SamiError(f"{self.path}: could not take the run lock; remove the file if no run is active")

    def __exit__(self, *exc) -> None:
        if _read_pid(self.path) == os.getpid():
            self.path.unlink(missing_ok=True)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

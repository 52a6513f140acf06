"""What this machine has (its memory, its CPU cores, MLX's backend) and the choices that depend on it:
--grad-accumulation auto and --dequantize auto."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sami_mlx.config import AUTO
from sami_mlx.memory import GiB, ModelShape, RunShape, estimate_memory, format_gib


@dataclass(frozen=True)
class MachineMemory:
    total: float
    usable: float  # what MLX can use without swapping (Metal's working-set limit on macOS)


def machine_memory(total_gb: float | None = None) -> MachineMemory:
    """This machine's memory, or `total_gb` to plan for another one."""
    if total_gb:
        total = total_gb * GiB
    else:
        try:
            total = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            total = 0.0
    if sys.platform != "darwin":
        return MachineMemory(total, total)
    if not total_gb:
        try:
            import mlx.core as mx

            info = mx.device_info()
            total = float(info.get("memory_size", total))
            if info.get("max_recommended_working_set_size"):
                return MachineMemory(total, float(info["max_recommended_working_set_size"]))
        except Exception:  # an mlx without device_info: fall back to Metal's usual share
            pass
    # Metal lets the GPU wire about two thirds of a small Mac's memory and three quarters of a large one's.
    return MachineMemory(total, total * (0.75 if total >= 36 * GiB else 0.67))


def fit(need: float, machine: MachineMemory) -> str:
    """'yes', 'tight' (over what MLX may use but under the memory: swapping, slow) or 'no'."""
    if not machine.total:
        return "?"
    return "yes" if need <= machine.usable else "tight" if need <= machine.total else "no"


# ---- --grad-accumulation auto ----------------------------------------------------------------

HEADROOM = 0.8  # auto plans for this share of what MLX can use: the estimate is good to about 20%


def auto_micro_batches(shape: ModelShape, run: RunShape, queries_per_step: int, machine: MachineMemory) -> int:
    """--grad-accumulation auto: the fewest micro-batches (of `queries_per_step` query groups) whose
    estimate fits `machine` with HEADROOM; one group per micro-batch when none does (the run's memory
    check then says so), and 1 when the machine's memory is unknown."""
    if not machine.total:
        return 1
    seen = set()
    for n in range(1, queries_per_step + 1):
        groups = math.ceil(queries_per_step / n)
        if groups in seen:  # as many groups per micro-batch as with fewer micro-batches: no gain
            continue
        seen.add(groups)
        if estimate_memory(shape, replace(run, groups_per_micro_batch=groups)).peak <= HEADROOM * machine.usable:
            return n
    return queries_per_step


def resolve_micro_batches(
    cfg: Any, shape: ModelShape | None, variants: int, prompt_tokens: int, machine: MachineMemory
):
    """`cfg` (a TrainConfig) with --grad-accumulation auto replaced by its choice for `shape` (as loaded)
    on `machine`; a number is kept, and an unknown architecture (None) runs one micro-batch."""
    if cfg.grad_accumulation != AUTO:
        return cfg
    n = 1
    if shape is not None:
        n = auto_micro_batches(shape, RunShape.from_config(cfg, variants, prompt_tokens), cfg.queries_per_step, machine)
    return replace(cfg, grad_accumulation=n)


# ---- dequantizing on the CPU -----------------------------------------------------------------

# `--dequantize auto` dequantizes when the fp32 weights take at most this share of the machine's memory:
# the rest stays free for the run's activations, the sampling's KV caches and the rest of the machine.
DEQUANTIZE_SHARE = 0.25


@dataclass(frozen=True)
class Dequantize:
    """Whether to load a quantized model's weights as fp32, and why in words ('' when there is nothing to
    say: an unquantized model, or a GPU under `auto`)."""

    apply: bool
    reason: str = ""


def choose_dequantize(
    mode: str, bits: int | None, fp32_bytes: float, cpu: bool, total: float | None = None
) -> Dequantize:
    """--dequantize `mode` (auto, yes, no) for a model with `bits`-bit weights (None: not quantized) whose
    fp32 weights take `fp32_bytes`, on MLX's CPU backend or not, on a machine with `total` bytes (None:
    this one). MLX's quantized matmul is 10-30x slower than fp32 on the CPU (benchmarks/dequantize.py),
    so `auto` trains LoRA on fp32 weights there when they fit in a quarter of the memory."""
    if bits is None:
        return Dequantize(False)
    size = format_gib(fp32_bytes)
    if mode == "yes":
        width = f" to fp32 ({size})" if cpu else ""
        return Dequantize(True, f"dequantized the {bits}-bit weights{width} at load (--dequantize yes)")
    if not cpu:
        return Dequantize(False)
    if mode == "no":
        return Dequantize(
            False, f"kept the {bits}-bit weights quantized (--dequantize no): on the CPU their matmuls are slow"
        )
    total = machine_memory().total if total is None else total
    if total and fp32_bytes <= DEQUANTIZE_SHARE * total:
        return Dequantize(
            True,
            f"dequantized the {bits}-bit weights to fp32 at load (--dequantize auto): MLX computes on the CPU, "
            f"where quantized matmuls are 10-30x slower, and the fp32 weights ({size}) take at most a quarter "
            f"of this machine's {format_gib(total)}; --dequantize no keeps them quantized",
        )
    return Dequantize(
        False,
        f"kept the {bits}-bit weights quantized (--dequantize auto): in fp32 they would take {size}, more than "
        f"a quarter of this machine's {format_gib(total)}; --dequantize yes dequantizes them anyway",
    )


# ---- the CPU ---------------------------------------------------------------------------------


def cpu_backend() -> bool:
    """Whether MLX computes on the CPU here (False where it has no backend at all)."""
    try:
        import mlx.core as mx

        return mx.default_device() == mx.cpu
    except Exception:  # no MLX backend at all: plan as for a GPU
        return False


# Where a container's CPU quota is read (cgroup v2, then v1): `docker --cpus=1` leaves every core
# schedulable but grants one core's worth of time.
CPU_QUOTA_FILES = (Path("/sys/fs/cgroup/cpu.max"), Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"))


def local_cores() -> int:
    """The CPU cores this process may use: those it may run on, capped by its container's CPU quota
    (whole cores, at least one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cpu_quota()
    return max(1, min(cores, int(quota))) if quota is not None else cores


def _cpu_quota() -> float | None:
    """Cores' worth of CPU time the container grants per period, or None without a limit."""
    v2, v1 = CPU_QUOTA_FILES
    try:
        if v2.exists():  # "max 100000" or "150000 100000"
            quota, period = v2.read_text().split()[:2]
        else:  # cpu.cfs_quota_us beside cpu.cfs_period_us; -1: no limit
            quota, period = v1.read_text().strip(), v1.with_name("cpu.cfs_period_us").read_text().strip()
        return None if quota in ("max", "-1") else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None

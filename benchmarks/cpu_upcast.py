"""Benchmark: a 4-bit 4096x4096 layer (a 7B model's attention projection) on MLX's CPU backend with
the 16-bit scales quantized models ship with vs the fp32 scales `sami_mlx.model.upcast_for_cpu`
gives them at load. Prints ms per token-row and the speed-up; ends with a JSON line."""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import mlx.nn as nn
from common import report

from sami_mlx.model import upcast_for_cpu


def layer_time(layer: nn.Module, rows: int, dtype, reps: int) -> float:
    x = mx.random.normal((1, rows, 4096)).astype(dtype)
    mx.eval(layer(x))
    t0 = time.perf_counter()
    for _ in range(reps):
        mx.eval(layer(x))
    return (time.perf_counter() - t0) / reps / rows


def run(rows: int, reps: int) -> dict:
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(4096, 4096, bias=False))
    nn.quantize(model, group_size=64, bits=4)
    layer = model.layers[0]
    layer.scales, layer.biases = layer.scales.astype(mx.float16), layer.biases.astype(mx.float16)
    before = layer.scales.nbytes * 2 + layer.weight.nbytes
    t16 = layer_time(layer, rows, mx.float16, reps)
    changed = upcast_for_cpu(model)
    after = layer.scales.nbytes * 2 + layer.weight.nbytes
    t32 = layer_time(layer, rows, mx.float32, reps)
    print(f"4-bit 4096x4096 layer, {rows} token-rows, CPU backend ({changed} tensors widened)")
    print(f"  fp16 scales (as shipped): {t16 * 1e3:8.2f} ms per token-row")
    print(f"  fp32 scales (upcast)    : {t32 * 1e3:8.2f} ms per token-row")
    print(f"  speed-up {t16 / t32:.1f}x for {after / before:.2f}x the layer's memory")
    return {
        "ratio": t16 / t32,
        "fp16_ms_per_row": t16 * 1e3,
        "fp32_ms_per_row": t32 * 1e3,
        "memory_ratio": after / before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    mx.set_default_device(mx.cpu)
    report("cpu_upcast", **run(args.rows, args.reps))


if __name__ == "__main__":
    main()

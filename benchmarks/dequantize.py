"""Benchmark: a real quantized model (SmolLM2-135M-Instruct, 4-bit) on MLX's CPU backend kept quantized
(`--dequantize no`: QLoRA, scales widened to fp32) vs dequantized to fp32 at load (`--dequantize yes`,
what `auto` picks on a CPU): one decode step of a batch against a KV cache, and one SAMI training step
(the trainer's own `train_step`). Prints seconds and the ratio quantized/dequantized; ends with a JSON
line. The quantized side is slow (seconds per step), so the settings are small."""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from common import randomise_lora_b, report, timed
from mlx_lm.models.cache import make_prompt_cache
from trainer_step import make_groups, make_loop

from sami_mlx.errors import SamiError
from sami_mlx.loop.adapters import adapter_weights, set_adapter_weights
from sami_mlx.loop.rollout import Group
from sami_mlx.loop.train_step import train_step
from sami_mlx.model import resolve_model_path

MODEL = "smollm2-135m-instruct"


def decode_step(model, batch: int, context: int):
    """A function running one decode step: `batch` sequences × 1 new token after `context` cached tokens.
    The cache is filled with random keys and values (a prefill would cost the quantized side minutes)."""
    mx.random.seed(0)
    cache = make_prompt_cache(model)
    attention = model.layers[0].self_attn
    dim = getattr(attention, "head_dim", None) or model.args.hidden_size // model.args.num_attention_heads
    for c in cache:
        c.update_and_fetch(*(mx.random.normal((batch, attention.n_kv_heads, context, dim)) for _ in range(2)))
    mx.eval([c.state for c in cache])
    tokens = mx.random.randint(5, 1000, (batch, 1))

    def step():
        for c in cache:
            c.offset = context  # each call decodes the same next position
        mx.eval(model(tokens, cache=cache))

    return step


def measure(path: Path, mode: str, args, start: dict | None) -> tuple[float, float, str, dict]:
    """(decode seconds, training-step seconds, load note, starting adapters) with --dequantize `mode`."""
    notes: list[str] = []
    loop = make_loop(path, Path(tempfile.mkdtemp()), notes.append, dequantize=mode, variants=str(args.variants))
    if start is None:  # non-zero adapters, the same on both sides
        mx.random.seed(0)
        randomise_lora_b(loop.model, 0.01)
        start = adapter_weights(loop.model)
    set_adapter_weights(loop.model, start)
    # The quantized side takes seconds a call: one call, no warm-up (MLX's CPU backend compiles nothing
    # ahead, so a first call costs about what later ones do). Otherwise the fastest of a few.
    reps, warmup = (1, 0) if mode == "no" else (3, 1)
    decode, _ = timed(decode_step(loop.model, args.batch, args.context), reps, warmup)
    n = args.variants  # make_groups draws four; the first n keep the quantized step short
    s = dict(groups=args.groups, prompt=args.prompt, response=args.response)
    groups = [Group(g.query_index, g.query, g.variants[:n], g.generations[:n]) for g in make_groups(loop, s)]
    train, _ = timed(lambda: train_step(loop.step_parts, groups, random.Random(0)), reps, warmup)
    args.prompt_tokens = max(len(p) for g in loop.step_parts.scoring_batch(groups, random.Random(0)).prompts for p in g)
    return decode, train, "; ".join(notes), start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=MODEL, help=f"A quantized model: preset, hub id or directory ({MODEL}).")
    parser.add_argument("--batch", type=int, default=64, help="Sequences in the decode step (64).")
    parser.add_argument("--context", type=int, default=32, help="Tokens in the decode step's KV cache (32).")
    parser.add_argument("--groups", type=int, default=1, help="Query groups in the training step (1).")
    parser.add_argument("--variants", type=int, default=2, choices=range(2, 5), help="Variants per group (2).")
    parser.add_argument(
        "--prompt", type=int, default=32, help="Prompt tokens the training step aims at (make_groups; 32)."
    )
    parser.add_argument("--response", type=int, default=4, help="Response tokens in the training step (4).")
    args = parser.parse_args()
    mx.set_default_device(mx.cpu)
    try:
        path = resolve_model_path(args.model)
    except SamiError as e:
        sys.exit(f"dequantize benchmark: {e} (`sami-mlx models pull {MODEL}` fetches the preset)")
    start = None
    results = {}
    for mode in ("no", "yes"):
        *results[mode], start = measure(path, mode, args, start)
    (dq_q, train_q, note_q), (dq_f, train_f, note_f) = results["no"], results["yes"]
    if not note_q.startswith("kept"):
        sys.exit(f"dequantize benchmark: {args.model} is not quantized; pass a quantized model with --model")
    print(f"{args.model} on MLX's CPU backend: kept quantized vs dequantized to fp32 at load")
    print(f"  ({note_f})")
    print(
        f"  decode step, {args.batch} sequences x 1 token after {args.context} cached: "
        f"{dq_q:7.2f} s vs {dq_f:6.3f} s = {dq_q / dq_f:5.1f}x"
    )
    print(
        f"  SAMI training step (train_step, KL and anchor terms on), {args.groups} group(s) of {args.variants} "
        f"variants, prompts of {args.prompt_tokens} tokens, responses of {args.response}: "
        f"{train_q:7.2f} s vs {train_f:6.3f} s = {train_q / train_f:5.1f}x"
    )
    report(
        "dequantize",
        model=args.model,
        decode_ratio=dq_q / dq_f,
        train_step_ratio=train_q / train_f,
        decode_s={"quantized": dq_q, "dequantized": dq_f},
        train_step_s={"quantized": train_q, "dequantized": train_f},
    )


if __name__ == "__main__":
    main()

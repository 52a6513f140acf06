"""Shared pieces of the ratio benchmarks: random models of a given size and timing helpers."""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

SIZES = {
    # name: (hidden, layers, heads, intermediate)
    "tiny": (64, 2, 4, 128),
    "100m": (768, 12, 12, 2048),
}


def build_model(size: str, seed: int = 0, arch: str = "llama") -> Path:
    """A random-weight fp32 directory (llama or qwen2) of the given size, with a small byte-level BPE."""
    from importlib import import_module

    from sami_mlx.toy import world as toyworld
    from sami_mlx.toy.pretrain import train_tokenizer

    module = import_module(f"mlx_lm.models.{arch}")
    hidden, layers, heads, inter = SIZES[size]
    out = Path(tempfile.mkdtemp(prefix=f"sami-bench-{arch}-{size}-"))
    tok = train_tokenizer([p + r for p, r in toyworld.corpus(2000, 0)], 1024, out)
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": tok.get_vocab_size(),
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 1024,
        "bos_token_id": tok.token_to_id("<s>"),
        "eos_token_id": tok.token_to_id("</s>"),
    }
    (out / "config.json").write_text(json.dumps(config))
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return out


def parameters(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def randomise_lora_b(model, std: float) -> None:
    """Draw every adapter's B matrix (zero when attached) from N(0, std²): adapters that change the output."""

    def draw(path: str, value: mx.array) -> mx.array:
        return mx.random.normal(value.shape) * std if path.endswith("lora_b") else value

    model.update(tree_map_with_path(draw, model.trainable_parameters()))


def random_ids(n: int, vocab: int, rng: random.Random) -> list[int]:
    return [rng.randrange(5, vocab) for _ in range(n)]


def timed(fn, reps: int, warmup: int = 1) -> tuple[float, float]:
    """(fastest seconds, step memory in bytes) of fn() over reps runs after warmup: the fastest, not
    the median, because other work on a shared machine only ever adds time.

    Step memory is the peak above what was resident before the step (the weights, adapters and
    optimizer state, the same for every method compared): what the step itself needs."""
    for _ in range(warmup):
        fn()
    times = []
    mx.clear_cache()
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), mx.get_peak_memory() - resident


def report(name: str, **fields) -> None:
    """The closing JSON line every benchmark prints."""
    print(json.dumps({"benchmark": name, **fields}))


def main_by_size(name: str, run: Callable[[str], dict], description: str | None) -> None:
    """The command line of a benchmark `run` once per model size (`--sizes`, default all): a report line each."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    for size in parser.parse_args().sizes:
        report(f"{name}/{size}", **run(size))


# Training-step benchmarks: N=4 variants, prompt:response 4:1, sized to run in minutes on a CPU.
STEP_SETTINGS = {
    "tiny": dict(groups=4, prompt=128, response=32, reps=5),
    "100m": dict(groups=1, prompt=64, response=16, reps=2),
}


def step_setup(size: str, n: int = 4):
    """(model with LoRA adapters, ScoringBatch of random groups, settings) for a training-step benchmark."""
    import mlx_lm

    from sami_mlx.loop.adapters import attach_adapters
    from sami_mlx.loop.scoring import ScoringBatch

    s = STEP_SETTINGS[size]
    model, tok = mlx_lm.load(str(build_model(size)))
    mx.random.seed(0)
    attach_adapters(model, rank=8, scale=20.0, num_layers=-1)
    rng = random.Random(0)
    batch = ScoringBatch(
        [[random_ids(s["prompt"], tok.vocab_size, rng) for _ in range(n)] for _ in range(s["groups"])],
        [[random_ids(s["response"], tok.vocab_size, rng) for _ in range(n)] for _ in range(s["groups"])],
    )
    return model, batch, s

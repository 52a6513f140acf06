"""Benchmark: the trainer's own step (`train_step`: batching, dispatch, loss, gradients,
update), prefix-shared vs the naive N² batch, and compiled (`--compile`) vs not, on llama and qwen2.

N=4 variants, prompt:response about 4:1, the same groups and starting adapters for every variant
of the step. Ends with one JSON line per architecture and size.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import mlx.core as mx
from common import SIZES, STEP_SETTINGS, build_model, parameters, randomise_lora_b, report, timed

from sami_mlx.config import TrainConfig
from sami_mlx.inputs.constitution import Variant
from sami_mlx.loop.adapters import adapter_weights, set_adapter_weights
from sami_mlx.loop.prepare import prepare_inputs
from sami_mlx.loop.rollout import Generation, Group
from sami_mlx.loop.scoring import score_naive, score_shared
from sami_mlx.loop.train_step import train_step
from sami_mlx.loop.trainer import SamiLoop
from sami_mlx.model import load_model

CONSTITUTION = "name: bench\nprinciples:\n" + "".join(
    f"  - {{name: p{k}, positive: Be kind and brief {k}., negative: Be rude and long {k}.}}\n" for k in range(2)
)


def make_loop(model_dir: Path, tmp: Path, note=None, **kw) -> SamiLoop:
    (tmp / "c.yaml").write_text(CONSTITUTION)
    (tmp / "q.txt").write_text("hello\n")
    cfg = TrainConfig(
        model=str(model_dir),
        constitution=str(tmp / "c.yaml"),
        queries=str(tmp / "q.txt"),
        **{"variants": "4", "lora_layers": -1, "learning_rate": 1e-5, "out": str(tmp), **kw},
    ).resolved()
    model, tokenizer, _ = load_model(cfg.model, dequantize=cfg.dequantize, note=note)
    loop = SamiLoop(cfg, prepare_inputs(cfg), model, tokenizer, tmp, lambda e: None)
    model.train()
    return loop


def make_groups(loop: SamiLoop, s: dict) -> list[Group]:
    """Groups with s['response']-token responses whose query is s['prompt'] - 40 tokens long (the
    template and the four-variant constitution add the rest)."""
    rng = random.Random(0)
    filler = " ".join(["word"] * s["prompt"])
    ids = loop.tokenizer.encode(filler)
    query = loop.tokenizer.decode(ids[: max(s["prompt"] - 40, 4)])
    variants = [Variant(v) for v in ((True, True), (False, True), (True, False), (False, False))]
    return [
        Group(
            g,
            query,
            variants,
            [
                Generation([rng.randrange(5, loop.tokenizer.vocab_size) for _ in range(s["response"])], "", "length")
                for _ in variants
            ],
        )
        for g in range(s["groups"])
    ]


def run(size: str, arch: str) -> dict:
    s = STEP_SETTINGS[size]
    model_dir = build_model(size, arch=arch)
    results, start = {}, None
    for name, kw in (("naive", {"scoring": "naive"}), ("shared", {}), ("shared_compiled", {"compile": True})):
        loop = make_loop(model_dir, Path(tempfile.mkdtemp()), **kw)
        if start is None:  # non-zero adapters, the same for every variant of the step
            mx.random.seed(0)
            randomise_lora_b(loop.model, 0.01)
            start = adapter_weights(loop.model)
        set_adapter_weights(loop.model, start)
        groups = make_groups(loop, s)

        def step(loop=loop, groups=groups):
            return train_step(loop.step_parts, groups, random.Random(0))

        results[name] = timed(step, s["reps"], warmup=2 if "compiled" in name else 1)
        if name == "shared":
            batch = loop.step_parts.scoring_batch(groups, random.Random(0))
            prompt = max(len(p) for g in batch.prompts for p in g)
            set_adapter_weights(loop.model, start)
            diff = mx.abs(score_naive(loop.model, batch) - score_shared(loop.model, batch)).max().item()
            shared_path = loop.shared
    (t_naive, m_naive), (t_shared, m_shared), (t_comp, m_comp) = (
        results[k] for k in ("naive", "shared", "shared_compiled")
    )
    print(
        f"[{arch}/{size}] {parameters(loop.model) / 1e6:.1f}M params, N=4, {s['groups']} groups, "
        f"prompts of {prompt} : responses of {s['response']} tokens; the trainer's step (train_step)"
    )
    print(f"  naive N² batch        : {t_naive * 1e3:8.1f} ms/step, step memory {m_naive / 2**20:8.1f} MiB")
    print(
        f"  prefix-shared         : {t_shared * 1e3:8.1f} ms/step, step memory {m_shared / 2**20:8.1f} MiB"
        f"  (the path a run takes: {'shared' if shared_path else 'naive'})"
    )
    print(f"  prefix-shared compiled: {t_comp * 1e3:8.1f} ms/step, step memory {m_comp / 2**20:8.1f} MiB")
    print(
        f"  shared vs naive {t_naive / t_shared:.2f}x, compiled vs not {t_shared / t_comp:.2f}x, "
        f"max |S_naive - S_shared| = {diff:.2e}"
    )
    return {
        "shared_vs_naive": t_naive / t_shared,
        "compiled_vs_plain": t_shared / t_comp,
        "peak_memory_ratio": m_shared / m_naive,
        "compiled_memory_ratio": m_comp / m_shared,
        "max_abs_diff": diff,
        "run_takes_shared_path": shared_path,
        "prompt_tokens": prompt,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--archs", nargs="*", default=["llama", "qwen2"], choices=["llama", "qwen2"])
    args = parser.parse_args()
    for size in args.sizes:
        for arch in args.archs:
            report(f"trainer_step/{arch}/{size}", **run(size, arch))


if __name__ == "__main__":
    main()

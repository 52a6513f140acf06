"""Benchmark: a SAMI training step's memory at 7B widths with a real vocabulary, and the estimate.

A random-weight fp32 model with Mistral-7B's widths (hidden 4096, MLP 14336, 32 heads, 8 KV heads,
untied lm_head) and a 32k and a 128k vocabulary (Mistral, Llama 3), built in memory with a few blocks
so that it runs on a CPU. One optimizer step of the trainer (`train_step`, the shared scoring
path with its KL and anchor terms, every block adapted) on hand-made groups of random response ids, run
twice: the output layer a chunk of tokens at a time (sami_mlx.loop.logits, today), and with the full
logits (the path before it). Prints, per vocabulary, the estimate (`estimate_memory`, what
`--dry-run` and `--grad-accumulation auto` use) against the measured peak, and the chunked peak
against the full-logits one; ends with a JSON line. `--shape smollm2` runs SmolLM2-135M's widths.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import random
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from common import report
from mlx_lm.models import llama

from sami_mlx.config import TrainConfig
from sami_mlx.inputs.constitution import Variant
from sami_mlx.loop import logits
from sami_mlx.loop.prepare import prepare_inputs
from sami_mlx.loop.rollout import Generation, Group
from sami_mlx.loop.train_step import train_step
from sami_mlx.loop.trainer import SamiLoop
from sami_mlx.memory import GiB, ModelShape, RunShape, estimate_memory

SHAPES = {
    "7b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
        "rope_theta": 1e4,
        "vocabularies": [32000, 128256],
    },
    "smollm2": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "tie_word_embeddings": True,
        "rope_theta": 1e5,
        "vocabularies": [49152],
    },
}


def model_config(shape: str, vocab: int, layers: int) -> dict:
    widths = {k: v for k, v in SHAPES[shape].items() if k != "vocabularies"}
    return {
        **widths,
        "model_type": "llama",
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
    }


def setup(root: Path, args) -> TrainConfig:
    """A one-principle constitution (two variants), two queries and a tokenizer for the prompts; the
    model itself is built in memory (its vocabulary may be larger than the tokenizer's)."""
    from sami_mlx.toy import world as toyworld
    from sami_mlx.toy.pretrain import train_tokenizer

    (root / "tokenizer").mkdir()
    train_tokenizer([p + r for p, r in toyworld.corpus(500, 0)], 512, root / "tokenizer")
    principles = "".join(
        f"  - {{name: p{i}, positive: Be kind {i}., negative: Be rude {i}.}}\n" for i in range(args.principles)
    )
    (root / "c.yaml").write_text("name: m\nprinciples:\n" + principles)
    (root / "q.txt").write_text("hi\nhello\n")
    (root / "t.txt").write_text("{constitution}\n{query}\n")
    return TrainConfig(
        model=str(root / "tokenizer"),
        constitution=str(root / "c.yaml"),
        queries=str(root / "q.txt"),
        template=str(root / "t.txt"),
        queries_per_step=args.groups,
        grad_accumulation=1,
        max_tokens=args.response,
        lora_layers=-1,
        stop=[],
        out=str(root / "run"),
    ).resolved()


def measure(cfg: TrainConfig, config: dict, args) -> dict:
    """Measured step peaks (chunked, then full logits) and the estimate, in bytes."""
    from mlx_lm.utils import load_tokenizer

    gc.collect()
    mx.clear_cache()
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    resident = mx.get_active_memory()
    tokenizer = load_tokenizer(Path(cfg.model))
    loop = SamiLoop(cfg, prepare_inputs(cfg), model, tokenizer, Path(cfg.out), lambda e: None)
    rng = random.Random(0)
    query = " ".join(["tell me about bread"] * args.prompt)

    variants = [Variant(v) for v in itertools.product((True, False), repeat=args.principles)]

    def group(q: int) -> Group:
        answers = [
            Generation([rng.randrange(5, config["vocab_size"]) for _ in range(args.response)], "", "length")
            for _ in variants
        ]
        return Group(q, query, variants, answers)

    groups = [group(q) for q in range(args.groups)]
    longest = max(len(p) for g in loop.step_parts.scoring_batch(groups, random.Random(0)).prompts for p in g)
    model.train()
    peaks = {}
    for path in ("chunked", "full"):
        saved = logits.SPLIT_ARCHITECTURES
        if path == "full":
            logits.SPLIT_ARCHITECTURES = frozenset()  # every model keeps its full logits, as before
        gc.collect()
        mx.clear_cache()
        t0 = time.perf_counter()
        result = train_step(loop.step_parts, groups, random.Random(1))
        assert result is not None
        peaks[path] = (result.peak_memory_gb * GiB, time.perf_counter() - t0)
        logits.SPLIT_ARCHITECTURES = saved
    shape = ModelShape.from_config({**config, "torch_dtype": "float32"})
    est = estimate_memory(shape, RunShape.from_config(cfg, len(variants), longest))
    del loop, model
    gc.collect()
    mx.clear_cache()
    return {"peaks": peaks, "estimate": est, "resident": resident, "prompt": longest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--layers", type=int, default=1, help="blocks (default 1: a 7B block is 0.9 GB in fp32)")
    parser.add_argument("--groups", type=int, default=1, help="query groups in the step")
    parser.add_argument("--principles", type=int, default=1, help="principles: 2^k variants per group")
    parser.add_argument("--prompt", type=int, default=6, help="the query repeats 'tell me about bread' this often")
    parser.add_argument("--response", type=int, default=32, help="tokens per response")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sami-bench-memory-"))
    cfg = setup(root, args)
    results = {}
    for vocab in SHAPES[args.shape]["vocabularies"]:
        config = model_config(args.shape, vocab, args.layers)
        results[vocab] = r = measure(cfg, config, args)
        if vocab == SHAPES[args.shape]["vocabularies"][0]:
            widths = f"hidden {config['hidden_size']}, MLP {config['intermediate_size']}"
            print(
                f"{args.shape} widths ({widths}, {config['num_attention_heads']}/{config['num_key_value_heads']} "
                f"heads), {args.layers} block(s), fp32, random weights, every block adapted; one step of "
                f"{args.groups} query group(s) x {2**args.principles} variants, prompts {r['prompt']} tokens, "
                f"responses {args.response}, KL and anchor on, on the {mx.default_device()} backend"
            )
        (chunked, t_chunked), (full, t_full) = r["peaks"]["chunked"], r["peaks"]["full"]
        est, resident = r["estimate"], r["resident"]
        print(
            f"  vocab {vocab:>6}: step peak {chunked / GiB:6.2f} GiB chunked, {full / GiB:6.2f} GiB full logits "
            f"({chunked / full:.2f}x; above the weights {(chunked - resident) / GiB:.2f} vs "
            f"{(full - resident) / GiB:.2f} GiB, {(chunked - resident) / (full - resident):.2f}x); "
            f"estimate {est.training_peak / GiB:6.2f} GiB ({est.training_peak / chunked:.2f}x the measured peak; "
            f"above the weights {est.training / GiB:.2f} GiB, {est.training / (chunked - resident):.2f}x); "
            f"{t_chunked:.0f} s vs {t_full:.0f} s"
        )
    report(
        f"memory/{args.shape}",
        layers=args.layers,
        **{
            f"vocab_{v}": {
                "chunked_gib": r["peaks"]["chunked"][0] / GiB,
                "full_logits_gib": r["peaks"]["full"][0] / GiB,
                "chunked_over_full": r["peaks"]["chunked"][0] / r["peaks"]["full"][0],
                "estimated_gib": r["estimate"].training_peak / GiB,
                "estimated_over_measured": r["estimate"].training_peak / r["peaks"]["chunked"][0],
                "resident_gib": r["resident"] / GiB,
            }
            for v, r in results.items()
        },
    )


if __name__ == "__main__":
    main()

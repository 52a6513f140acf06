"""Benchmark: the memory estimate against the measured peak of a real run on a random-weight 4-bit
model with Mistral-7B's widths (hidden 4096, MLP 14336, 32 heads, 8 KV heads, 32k vocabulary) and a
few blocks, built here (no download). Each size runs one full SAMI loop (sampling, one training
step, checkpoint) through `train()`; the per-block growth of the estimate and of the measured peak
extrapolates both to the 32 blocks of the real model. Ends with a JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from common import report
from mlx.utils import tree_flatten

from sami_mlx import events as ev
from sami_mlx.config import TrainConfig
from sami_mlx.loop.trainer import check_context, prepare_inputs, train
from sami_mlx.memory import GiB, ModelShape, RunShape, estimate_memory

WIDTHS = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e4,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
    "model_type": "llama",
}


def build(layers: int, root: Path) -> Path:
    """A 4-bit model as mlx-community ships them (fp16 scales), random weights, `layers` blocks."""
    from mlx_lm.models import llama

    from sami_mlx.toy import world as toyworld
    from sami_mlx.toy.pretrain import train_tokenizer

    out = root / f"mistral-widths-{layers}"
    out.mkdir(parents=True)
    tok = train_tokenizer([p + r for p, r in toyworld.corpus(500, 0)], 512, out)
    # Fill the vocabulary to 32k with plain words, so that every sampled id decodes to text.
    tok.add_tokens([f" w{i}" for i in range(tok.get_vocab_size(), WIDTHS["vocab_size"])])
    tok.save(str(out / "tokenizer.json"))
    config = {
        **WIDTHS,
        "num_hidden_layers": layers,
        "bos_token_id": tok.token_to_id("<s>"),
        "eos_token_id": tok.token_to_id("</s>"),
        "torch_dtype": "float16",
        "quantization": {"group_size": 64, "bits": 4},
    }
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(mx.float16)
    nn.quantize(model, group_size=64, bits=4)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config))
    del model
    mx.clear_cache()
    return out


def run_once(layers: int, root: Path) -> tuple[float, float]:
    """(measured peak of the training step, estimated training peak), bytes."""
    from mlx_lm.utils import load_tokenizer

    model_dir = build(layers, root)
    (root / "c.yaml").write_text("name: m\nprinciples:\n  - {name: a, positive: Be kind., negative: Be rude.}\n")
    (root / "q.txt").write_text("hi\nhello\n")
    (root / "t.txt").write_text("{constitution}\n{query}\n")
    cfg = TrainConfig(
        model=str(model_dir),
        constitution=str(root / "c.yaml"),
        queries=str(root / "q.txt"),
        template=str(root / "t.txt"),
        iterations=1,
        steps=1,
        queries_per_step=1,
        max_tokens=4,
        lora_layers=-1,
        stop=[],
        out=str(root / f"run-{layers}"),
    ).resolved()
    steps = []
    train(cfg, callbacks=[lambda e: steps.append(e) if isinstance(e, ev.StepCompleted) else None])
    inputs = prepare_inputs(cfg)
    longest = check_context(cfg, inputs, load_tokenizer(model_dir), None)
    shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text())).in_float_bytes(4)
    est = estimate_memory(shape, RunShape.from_config(cfg, inputs.num_variants, longest))
    mx.clear_cache()
    return steps[-1].peak_memory_gb * GiB, est.training_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", nargs=2, type=int, default=[1, 2], metavar=("A", "B"))
    args = parser.parse_args()
    a, b = args.layers
    root = Path(tempfile.mkdtemp(prefix="sami-bench-memory-"))
    (ma, ea), (mb, eb) = run_once(a, root), run_once(b, root)
    per_block_measured, per_block_estimated = (mb - ma) / (b - a), (eb - ea) / (b - a)
    m32, e32 = mb + (32 - b) * per_block_measured, eb + (32 - b) * per_block_estimated
    print("4-bit, Mistral-7B widths, random weights, fp32 scales on the CPU backend, every block adapted")
    for n, m, e in ((a, ma, ea), (b, mb, eb)):
        print(f"  {n} block(s): measured step peak {m / GiB:6.2f} GiB, estimated {e / GiB:6.2f} GiB ({e / m:.2f}x)")
    print(f"  per block: measured {per_block_measured / GiB:.3f} GiB, estimated {per_block_estimated / GiB:.3f} GiB")
    print(f"  extrapolated to 32 blocks: measured {m32 / GiB:.1f} GiB, estimated {e32 / GiB:.1f} GiB")
    report(
        "memory/mistral-7b-widths",
        estimated_over_measured=eb / mb,
        per_block_gib={"measured": per_block_measured / GiB, "estimated": per_block_estimated / GiB},
        at_32_blocks_gib={"measured": m32 / GiB, "estimated": e32 / GiB},
        peaks_gib={str(n): {"measured": m / GiB, "estimated": e / GiB} for n, m, e in ((a, ma, ea), (b, mb, eb))},
    )


if __name__ == "__main__":
    main()

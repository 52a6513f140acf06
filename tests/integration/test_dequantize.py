"""--dequantize: a quantized model loaded as fp32 on MLX's CPU backend gives the quantized model's outputs,
`auto` follows the memory rule, training runs on it, and its adapters load onto the quantized model."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten

from sami_mlx import machine
from sami_mlx.checkpoints import Checkpoint, load_checkpoint_model
from sami_mlx.cli.main import main
from sami_mlx.config import TrainConfig
from sami_mlx.config_file import config_from_file
from sami_mlx.errors import SamiError
from sami_mlx.fileio import read_jsonl
from sami_mlx.machine import MachineMemory
from sami_mlx.memory import GiB, ModelShape, RunShape
from sami_mlx.model import dequantize_for_cpu, fp32_weight_bytes, load_model
from sami_mlx.plan import dry_run_memory

TEXT = "Human: How do I bake bread? Assistant:"
CPU = mx.default_device() == mx.cpu


def quantize(tiny_model: Path, out: Path, dtype: str) -> Path:
    mlx_lm.convert(str(tiny_model), str(out), quantize=True, q_group_size=32, q_bits=4, dtype=dtype)
    return out


@pytest.fixture(scope="module")
def quantized(tiny_model, tmp_path_factory) -> Path:
    """The tiny fp32 model quantized to 4 bits (group 32) with fp32 scales, as an mlx-lm directory."""
    return quantize(tiny_model, tmp_path_factory.mktemp("q4") / "tiny-4bit", "float32")


@pytest.fixture(scope="module")
def quantized_fp16(tiny_model, tmp_path_factory) -> Path:
    """The same with fp16 scales and norms, as mlx-community ships 4-bit models."""
    return quantize(tiny_model, tmp_path_factory.mktemp("q4-16") / "tiny-4bit-fp16", "float16")


def logits_of(model, tokenizer) -> np.ndarray:
    return np.array(model(mx.array([tokenizer.encode(TEXT)])).astype(mx.float32))


def params(model) -> dict:
    return dict(tree_flatten(model.parameters()))


def machine_of(monkeypatch, total: float) -> None:
    monkeypatch.setattr(machine, "machine_memory", lambda total_gb=None: MachineMemory(total, total))


@pytest.mark.parametrize("scales", ["fp32", "fp16"])
def test_dequantized_model_gives_the_quantized_models_logits(quantized, quantized_fp16, scales):
    quantized = quantized if scales == "fp32" else quantized_fp16
    model, tokenizer, config = load_model(str(quantized), dequantize="no")  # on the CPU: scales widened to fp32
    assert any(k.endswith(".scales") for k in params(model))  # the check below compares two storages
    kept = logits_of(model, tokenizer)
    assert "quantization" in config

    notes: list[str] = []
    model, tokenizer, config = load_model(str(quantized), dequantize="yes", note=notes.append)
    weights = params(model)
    assert not any(k.endswith((".scales", ".biases")) for k in weights)
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    assert "quantization" not in config and "quantization_config" not in config  # describes the weights as loaded
    if CPU:
        assert all(v.dtype == mx.float32 for v in weights.values())
    assert notes and notes[0].startswith("dequantized the 4-bit weights")
    wide = logits_of(model, tokenizer)
    # The same numbers in another storage: only the order of the sums differs (fp16 scales are widened
    # before dequantizing, on the CPU as in upcast_for_cpu; a GPU computes both sides in 16 bits).
    tolerance = 1e-4 if CPU else 1e-2
    assert np.abs(wide - kept).max() < tolerance * max(1.0, np.abs(kept).max())


def test_fp32_weight_bytes_counts_the_unpacked_weights(tiny_model, quantized):
    full, _, _ = load_model(str(tiny_model))
    packed, _, _ = load_model(str(quantized), dequantize="no")
    assert fp32_weight_bytes(packed) == fp32_weight_bytes(full) == 4 * sum(v.size for v in params(full).values())


@pytest.mark.skipif(not CPU, reason="auto dequantizes only where MLX computes on the CPU")
def test_auto_dequantizes_on_the_cpu_within_a_quarter_of_memory(quantized, monkeypatch):
    model, _, _ = load_model(str(quantized), dequantize="no")
    need = fp32_weight_bytes(model)

    machine_of(monkeypatch, 4 * need)  # exactly a quarter: dequantized
    notes: list[str] = []
    model, _, config = load_model(str(quantized), note=notes.append)
    assert not any(k.endswith(".scales") for k in params(model)) and "quantization" not in config
    assert "--dequantize auto" in notes[0] and "MLX computes on the CPU" in notes[0]

    machine_of(monkeypatch, 4 * need - 1)  # a byte short: kept quantized, scales widened to fp32
    notes.clear()
    model, _, config = load_model(str(quantized), note=notes.append)
    scales = [v for k, v in params(model).items() if k.endswith(".scales")]
    assert scales and all(v.dtype == mx.float32 for v in scales) and config["quantization"]["bits"] == 4
    assert notes[0].startswith("kept the 4-bit weights quantized") and "--dequantize yes" in notes[0]


def test_an_unquantized_model_is_left_alone(tiny_model):
    model, _, _ = load_model(str(tiny_model))
    before = params(model)
    choice = dequantize_for_cpu(model, "yes")
    assert not choice.apply and choice.reason == ""
    assert all(params(model)[k] is v for k, v in before.items())


@pytest.mark.skipif(not CPU, reason="auto dequantizes only where MLX computes on the CPU")
def test_training_on_the_dequantized_model_gives_adapters_for_the_quantized_one(
    quantized, tiny_flags, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main(["train", *tiny_flags(model=quantized, learning_rate=1e-2, max_tokens=8, out=out)]) == 0
    assert "dequantized the 4-bit weights to fp32 at load (--dequantize auto)" in capsys.readouterr().err
    started = next(r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "RunStarted")
    assert started["model_note"].startswith("dequantized")
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "StepCompleted"]
    assert steps and all(np.isfinite(r["loss"]) for r in steps)

    # mlx-lm loads the adapters onto the quantized model as it is (QLoRA layers, same shapes) ...
    adapted, tokenizer = mlx_lm.load(str(quantized), adapter_path=str(out))
    assert any(k.endswith(".scales") for k in params(adapted))
    on_quantized = logits_of(adapted, tokenizer)
    base, _ = mlx_lm.load(str(quantized))
    assert np.abs(on_quantized - logits_of(base, tokenizer)).max() > 1e-4  # the adapters change the model
    # ... and gives what the run trained: the dequantized model with the same adapters.
    trained, _ = load_checkpoint_model(str(quantized), Checkpoint("run", out), dequantize="yes")
    assert np.abs(logits_of(trained, tokenizer) - on_quantized).max() < 1e-4 * max(1.0, np.abs(on_quantized).max())

    fused = tmp_path / "fused"
    assert main(["export", str(out), "--out", str(fused)]) == 0
    card = (fused / "README.md").read_text()
    assert "## Quantization" in card and "weights dequantized to full precision" in card
    assert "load onto the 4-bit model unchanged" in card and "quantized the fused weights back to 4 bits" in card
    assert json.loads((fused / "config.json").read_text())["quantization"]["bits"] == 4


def test_dry_run_estimates_the_dequantized_weights(monkeypatch):
    config = {
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "num_hidden_layers": 30,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "quantization": {"bits": 4, "group_size": 32},
    }
    shape = ModelShape.from_config(config)
    fp32 = shape.parameters * 4
    monkeypatch.setattr(machine, "cpu_backend", lambda: True)
    run = RunShape(prompt_tokens=64, response_tokens=32)
    wide = dry_run_memory(shape, "smol", run, None, total_gb=24)
    assert "fp32" in wide[0] and "4-bit" not in wide[0]
    assert wide[1].startswith("dequantized the 4-bit weights to fp32")
    assert f"weights {fp32 / GiB:.1f} GiB" in wide[2]

    small = dry_run_memory(shape, "smol", run, None, total_gb=fp32 * 4 / GiB * 0.9)
    assert "4-bit with fp32 scales" in small[0] and small[1].startswith("kept the 4-bit weights quantized")
    kept = dry_run_memory(shape, "smol", run, None, total_gb=24, dequantize="no")
    assert "4-bit" in kept[0] and f"weights {fp32 / GiB:.1f} GiB" not in kept[2]

    monkeypatch.setattr(machine, "cpu_backend", lambda: False)  # a GPU: auto keeps the quantized weights
    gpu = dry_run_memory(shape, "smol", run, None, total_gb=24)
    assert "4-bit" in gpu[0] and not gpu[1].startswith(("dequantized", "kept"))


def test_the_setting_reads_yaml_yes_and_no_and_refuses_others(tmp_path):
    for text, mode in (("yes", "yes"), ("no", "no"), ("auto", "auto")):
        path = tmp_path / f"{text}.yaml"
        path.write_text(f"dequantize: {text}\n")
        assert config_from_file(str(path))["dequantize"] == mode
    cfg = TrainConfig(model="m", constitution="c", dequantize="sometimes")
    with pytest.raises(SamiError, match="--dequantize 'sometimes': use 'auto', 'yes' or 'no'"):
        cfg.resolved()
    assert yaml.safe_load(yaml.safe_dump({"dequantize": "no"}))["dequantize"] == "no"  # config.yaml round trip

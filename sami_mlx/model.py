"""Loading a model and tokenizer (hub id or local directory) with errors a user can act on."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

from sami_mlx.errors import SamiError

if TYPE_CHECKING:
    import mlx.core as mx
    import mlx.nn as nn

    from sami_mlx.machine import Dequantize

UPCAST_DTYPES = ("float16", "bfloat16")


def resolve_model_path(name: str) -> Path:
    """A local model directory for `name` (a directory, a .gguf file, a preset name from models/, or a
    hub id), fetching, importing or building it first if needed (sami_mlx.sources)."""
    from sami_mlx.sources import resolve_model

    return resolve_model(name)


def load_model(
    name: str,
    trust_remote_code: bool = False,
    dequantize: str = "auto",
    note: Callable[[str], None] | None = None,
):
    """Load (model, tokenizer, config) with mlx-lm; no remote code unless asked. A quantized model is
    dequantized as --dequantize `dequantize` decides (dequantize_for_cpu; `config` then describes the
    weights as loaded, without its quantization), and `note` hears why in words."""
    import mlx_lm

    path = resolve_model_path(name)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SamiError(f"{path / 'config.json'}: unreadable model config ({e})") from None
    try:
        model, tokenizer = mlx_lm.load(
            str(path),
            tokenizer_config={"trust_remote_code": trust_remote_code},
            trust_remote_code=trust_remote_code,
        )[:2]
    except SamiError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise SamiError(f"--model {name}: mlx-lm could not load it ({first})") from None
    choice = dequantize_for_cpu(model, dequantize)
    if choice.apply:
        config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    if choice.reason and note is not None:
        note(choice.reason)
    check_vocabulary(model, tokenizer, config, name)
    return model, tokenizer, config


def flat_parameters(model: nn.Module) -> list[tuple[str, mx.array]]:
    """The model's parameters as (dotted name, array) pairs."""
    from mlx.utils import tree_flatten

    # tree_flatten returns a list unless given a dict `destination`; its annotation allows both.
    return cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters()))


# Next-token probability on ids past the tokenizer's vocabulary above which samples come out broken. A
# trained model whose rows are padded (Qwen pads to a multiple of 128) puts about 0 there.
UNDECODABLE_LIMIT = 0.01


def check_vocabulary(model, tokenizer, config: dict, name: str) -> None:
    """Refuse a tokenizer that does not belong to the weights: one whose ordinary tokens have no row in
    the model's embedding (MLX reads past the table without an error, and the model sees noise), or a
    model that gives its tokenizer's unknown ids enough probability to sample them (they decode to
    nothing: responses come out empty or torn). Rows padded beyond the tokenizer are normal."""
    import mlx.core as mx

    known = len(tokenizer)
    base = int(getattr(tokenizer, "vocab_size", known) or known)  # without added (special) tokens
    rows = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    fix = "use the tokenizer files saved with these weights (or fix vocab_size in config.json)"
    if rows and int(rows) < base:
        raise SamiError(
            f"--model {name}: its tokenizer has {base} tokens but the model's embedding only {rows} rows, so "
            f"token ids {rows}-{base - 1} read past it and the model sees noise; {fix}"
        )
    if rows is not None and int(rows) <= known:
        return
    ids = [i for i in tokenizer.encode("The") if i < base] or [0]
    logits = model(mx.array([ids]))[0, -1].astype(mx.float32)
    if logits.shape[-1] <= known:
        return
    mass = float(mx.softmax(logits)[known:].sum())
    if mass > UNDECODABLE_LIMIT:
        raise SamiError(
            f"--model {name}: the model has {logits.shape[-1]} output rows but its tokenizer decodes only "
            f"{known} ids, and it puts {mass:.0%} of its next-token probability on ids {known}-"
            f"{logits.shape[-1] - 1}, which decode to nothing (samples would come out empty); {fix}"
        )


def upcast_for_cpu(model) -> int:
    """On MLX's CPU backend, widen a quantized model's 16-bit scales and biases, norms, biases and
    embeddings to fp32; returns how many tensors changed (0 on a GPU or for an unquantized model).

    The CPU's quantized matmul is about 30x faster with fp32 scales than with the fp16 scales of
    mlx-community's 4-bit models (benchmarks/cpu_upcast.py), for about 11% more weight memory; the
    activations then run in fp32 as well. Unquantized 16-bit weights are left alone (doubling them
    would double the model's memory)."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    if mx.default_device() != mx.cpu:
        return 0
    params = flat_parameters(model)
    if not any(k.endswith(".scales") for k, _ in params):
        return 0
    wide = [
        (k, v.astype(mx.float32))
        for k, v in params
        if str(v.dtype).rsplit(".", 1)[-1] in UPCAST_DTYPES
        and (k.endswith((".scales", ".biases")) or v.ndim == 1 or "embed" in k)
    ]
    if wide:
        model.update(tree_unflatten(wide))
        mx.eval(model.parameters())
    return len(wide)


def quantized_bits(model: nn.Module) -> int | None:
    """The bit width that holds most of the model's quantized weights (a GGUF Q4 file keeps its embedding
    in 8 bits, say); None for an unquantized model."""
    weights: dict[int, int] = {}
    for _, m in model.named_modules():
        if "scales" in m and hasattr(m, "bits"):
            weights[int(m.bits)] = weights.get(int(m.bits), 0) + m.weight.size * 32 // int(m.bits)
    return max(weights, key=lambda bits: weights[bits]) if weights else None


def fp32_weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters take once dequantized to fp32."""
    elements = sum(v.size for _, v in flat_parameters(model))
    for _, m in model.named_modules():
        if "scales" in m and hasattr(m, "bits"):  # weight packs 32 // bits values in each uint32
            elements += (
                m.weight.size * (32 // int(m.bits) - 1) - m.scales.size - (m["biases"].size if "biases" in m else 0)
            )
    return 4 * elements


def dequantize_for_cpu(model: nn.Module, mode: str = "auto") -> Dequantize:
    """Apply --dequantize `mode` to a loaded model (sami_mlx.machine.choose_dequantize decides): replace its
    quantized layers by float ones with mlx-lm's dequantize_model, in fp32 on the CPU backend (where bf16
    and fp16 matmuls are slow too). A quantized model kept as it is gets `upcast_for_cpu`. Returns the
    choice and its reason."""
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model

    from sami_mlx.machine import choose_dequantize

    cpu = mx.default_device() == mx.cpu
    choice = choose_dequantize(mode, quantized_bits(model), fp32_weight_bytes(model), cpu)
    if not choice.apply:
        upcast_for_cpu(model)
        return choice
    if cpu:  # widen 16-bit scales first: weights dequantized in fp16 would carry its rounding (about 1e-3)
        upcast_for_cpu(model)
    dequantize_model(model)
    if cpu:
        model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return choice


def float_bytes(model) -> int:
    """Bytes of the float type the model computes in: its quantization scales' or its weights'."""
    params = flat_parameters(model)
    scales = [v for k, v in params if k.endswith(".scales")]
    weights = scales or [v for k, v in params if k.endswith(".weight") and v.ndim == 2]
    return weights[0].dtype.size if weights else 4


def weights_float_bytes(path: Path) -> int | None:
    """The float width of a local model's weights, read from a safetensors header (its scales' for a
    quantized model): a config.json often leaves torch_dtype out."""
    import struct

    widths = {"F32": 4, "F16": 2, "BF16": 2}
    for file in sorted(path.glob("*.safetensors"))[:1]:
        try:
            with open(file, "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        except (OSError, ValueError, struct.error):
            return None
        tensors = {k: v for k, v in header.items() if isinstance(v, dict) and "dtype" in v}
        scales = [v["dtype"] for k, v in tensors.items() if k.endswith(".scales")]
        floats = scales or [v["dtype"] for v in tensors.values() if v["dtype"] in widths]
        return widths.get(floats[0]) if floats else None
    return None

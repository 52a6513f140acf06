"""LoRA/DoRA adapters through mlx-lm's layers, saved in mlx-lm's adapter format."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from sami_mlx.fileio import atomic_save_safetensors, atomic_write_json

ADAPTER_TYPES = (LoRALinear, LoRASwitchLinear, LoRAEmbedding, DoRALinear, DoRAEmbedding)


def attach_adapters(
    model: nn.Module,
    rank: int,
    scale: float,
    dropout: float = 0.0,
    num_layers: int = 16,
    keys: list[str] | None = None,
    dora: bool = False,
) -> dict:
    """Freeze the model, add adapters to its last `num_layers` blocks, return mlx-lm's adapter config."""
    num_layers = len(model.layers) if num_layers <= 0 else min(num_layers, len(model.layers))
    params: dict[str, object] = {"rank": rank, "scale": scale, "dropout": dropout}
    if keys:
        params["keys"] = list(keys)
    model.freeze()
    linear_to_lora_layers(model, num_layers, params, use_dora=dora)
    if not tree_flatten(model.trainable_parameters()):
        raise ValueError(f"no layer matched the adapter keys {keys}; check --lora-keys")
    return {"fine_tune_type": "dora" if dora else "lora", "num_layers": num_layers, "lora_parameters": params}


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The trainable adapter tensors by their mlx-lm names."""
    return dict(tree_flatten(model.trainable_parameters()))


def set_adapter_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Overwrite the adapters (for re-initialisation or resume)."""
    model.update(tree_unflatten(list(weights.items())))
    mx.eval(model.trainable_parameters())


def save_adapters(model: nn.Module, directory: str | Path, adapter_config: dict, extra: dict | None = None) -> None:
    """Write the model's adapters.safetensors and adapter_config.json atomically, as mlx_lm.load expects."""
    save_adapter_weights(adapter_weights(model), directory, adapter_config, extra)


def save_adapter_weights(
    weights: dict[str, mx.array], directory: str | Path, adapter_config: dict, extra: dict | None = None
) -> None:
    """Write given adapter tensors and adapter_config.json atomically, as mlx_lm.load expects."""
    directory = Path(directory)
    atomic_save_safetensors(directory / "adapters.safetensors", weights)
    atomic_write_json(directory / "adapter_config.json", {**adapter_config, **(extra or {})})


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model by swapping each adapter layer for the layer it wraps, then swap back."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)]
    model.update_modules(tree_unflatten([(name, _base_of(m)) for name, m in wrapped]))
    try:
        yield
    finally:
        model.update_modules(tree_unflatten(wrapped))


def _base_of(layer: nn.Module) -> nn.Module:
    return layer.linear if hasattr(layer, "linear") else layer.embedding

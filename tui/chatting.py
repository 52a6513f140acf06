"""The chat screen's model holder and labels (plain Python: no Textual here). Prompts, stop strings and
streamed replies come from the engine (sami_mlx.chat), as in `sami-mlx chat`."""

from __future__ import annotations

import threading
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sami_mlx.checkpoints import Checkpoint, load_checkpoint_model
from sami_mlx.loop.adapters import adapters_disabled

if TYPE_CHECKING:
    import mlx.nn as nn


class ChatModels:
    """The one model the chat holds, loaded for a checkpoint; a lock keeps generations apart."""

    def __init__(self) -> None:
        self.key: tuple[str, str] | None = None
        self.model: nn.Module | None = None
        self.tokenizer: Any = None
        self.lock = threading.Lock()

    def load(self, model: str, checkpoint: Checkpoint):
        """(model, tokenizer) with the checkpoint's adapters, reusing the loaded one when it matches."""
        key = (model, str(checkpoint.adapter_path or ""))
        if key != self.key:
            self.model = self.tokenizer = self.key = None  # free the old weights before loading
            loaded, self.tokenizer = load_checkpoint_model(model, checkpoint)
            self.model = loaded
            import mlx.core as mx

            # Materialise every weight now: the loading thread's streams are gone when it ends.
            mx.eval(loaded.parameters())
            self.key = key
        return self.model, self.tokenizer

    def base_of(self, checkpoint: Checkpoint):
        """A context in which the loaded model runs as the base model (adapters switched off)."""
        if not checkpoint.adapter_path:
            return nullcontext()
        if self.model is None:
            raise RuntimeError("base_of: no model is loaded")
        return adapters_disabled(self.model)


def checkpoint_label(checkpoint: Checkpoint) -> str:
    return "base model" if checkpoint.adapter_path is None else f"{checkpoint.name} (aligned)"


def model_name(model: str) -> str:
    """A short model name for labels: the directory or repo name."""
    return Path(model).name or model

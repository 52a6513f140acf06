"""The chat screen's model holder and labels (plain Python: no Textual here). Prompts, stop strings and
streamed replies come from the engine (sami_mlx.chat), as in `sami-mlx chat`."""

from __future__ import annotations

import threading
from contextlib import nullcontext
from pathlib import Path

from sami_mlx.checkpoints import Checkpoint, load_checkpoint_model
from sami_mlx.loop.adapters import adapters_disabled


class ChatModels:
    """The one model the chat holds, loaded for a checkpoint; a lock keeps generations apart."""

    def __init__(self) -> None:
        self.key: tuple[str, str] | None = None
        self.model = self.tokenizer = None
        self.lock = threading.Lock()

    def load(self, model: str, checkpoint: Checkpoint):
        """(model, tokenizer) with the checkpoint's adapters, reusing the loaded one when it matches."""
        key = (model, str(checkpoint.adapter_path or ""))
        if key != self.key:
            self.model = self.tokenizer = self.key = None  # free the old weights before loading
            self.model, self.tokenizer = load_checkpoint_model(model, checkpoint)
            import mlx.core as mx

            # Materialise every weight now: the loading thread's streams are gone when it ends.
            mx.eval(self.model.parameters())
            self.key = key
        return self.model, self.tokenizer

    def base_of(self, checkpoint: Checkpoint):
        """A context in which the loaded model runs as the base model (adapters switched off)."""
        return adapters_disabled(self.model) if checkpoint.adapter_path else nullcontext()


def checkpoint_label(checkpoint: Checkpoint) -> str:
    return "base model" if checkpoint.adapter_path is None else f"{checkpoint.name} (aligned)"


def model_name(model: str) -> str:
    """A short model name for labels: the directory or repo name."""
    return Path(model).name or model

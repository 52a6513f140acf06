"""The chat screen's model holder and labels (plain Python: no Textual here). Prompts, stop strings and
streamed replies come from the engine (sami_mlx.chat), as in `sami-mlx chat`."""

from __future__ import annotations

import threading
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sami_mlx.checkpoints import Checkpoint, list_checkpoints, load_checkpoint_model
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


def checkpoint_label(checkpoint: Checkpoint, kept: str = "") -> str:
    """What a checkpoint is called on screen: "base", "iter-02", or "iter-01 (kept)" for the adapters
    the run kept (what RUN/adapters.safetensors holds)."""
    if checkpoint.adapter_path is None:
        return "base"
    return f"{checkpoint.name} (kept)" if kept and checkpoint.name == kept else checkpoint.name


def run_checkpoints(run_dir: str | Path | None, kept: str = "") -> list[Checkpoint]:
    """'base', then every finished iteration (sami_mlx.checkpoints), then the kept adapters when they are
    no iteration's own (a healthy step inside an iteration the monitor rolled back to: RUN's adapters)."""
    checkpoints = list_checkpoints(run_dir)
    if run_dir and kept and kept != "base" and kept not in {c.name for c in checkpoints}:
        run = Path(run_dir).expanduser()
        if (run / "adapters.safetensors").is_file() and (run / "adapter_config.json").is_file():
            checkpoints.append(Checkpoint(kept, run))
    return checkpoints


def model_name(model: str) -> str:
    """A short model name for labels: the directory or repo name."""
    return Path(model).name or model

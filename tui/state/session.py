"""What the screens share: the model, the constitution file and the run the app is about."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from tui.state.chatting import ChatModels


class Trainer(Protocol):
    """What the Run screen runs: the engine's sami_mlx.loop.trainer, or a stand-in with its train() and resume()."""

    @property
    def train(self) -> Callable[..., object]: ...

    @property
    def resume(self) -> Callable[..., object]: ...


@dataclass
class Session:
    """The app's shared state. Screens read it; only the app writes it, when a screen's message (RunChosen,
    ConstitutionOpened, ConstitutionSaved) says what changed."""

    trainer: Trainer
    model: str = ""  # hub id or directory for new runs and for chat without a run
    config: dict = field(default_factory=dict)  # run settings (TrainConfig fields), as `sami-mlx train -c` reads them
    constitution_path: str | None = None  # the file the editor holds
    run_dir: str | None = None  # the run shown on the Run screen and chatted with
    runs_dir: str = "runs"
    chat_models: ChatModels = field(default_factory=ChatModels)

"""sami-mlx: align a local language model to written principles with SAMI on MLX.

from sami_mlx import TrainConfig, train
result = train(TrainConfig(model=..., constitution=..., out="runs/x"), callbacks=[print])
"""

__version__ = "0.1.0"

_EXPORTS = {
    "TrainConfig": "sami_mlx.config",
    "train": "sami_mlx.loop.trainer",
    "resume": "sami_mlx.loop.trainer",
    "sami_loss": "sami_mlx.objective",
    "load_constitution": "sami_mlx.inputs.constitution",
    "SamiError": "sami_mlx.errors",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    # Imported on first use, so `sami-mlx --help` does not pay for MLX and mlx-lm.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sami_mlx' has no attribute {name!r}")

"""Where sami-mlx keeps what it builds or fetches (toy models, imported GGUF files, wheels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: $SAMI_MLX_CACHE, else $XDG_CACHE_HOME/sami-mlx, else ~/.cache/sami-mlx."""
    root = os.environ.get("SAMI_MLX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sami-mlx"
    )
    return Path(root)

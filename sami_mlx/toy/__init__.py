"""The synthetic principles worlds, their locally built base models, and `sami-mlx demo`."""

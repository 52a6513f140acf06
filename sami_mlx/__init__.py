"""sami-mlx: align a local language model to written principles with SAMI on MLX."""

__version__ = "0.1.0"

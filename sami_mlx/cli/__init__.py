"""The command line: one module per `sami-mlx` command, `main` routing onto them."""

"""`python -m sami_mlx.train`: the same command, flags and YAML configs as `sami-mlx train`
(sami_mlx.cli.train)."""

import sys

from sami_mlx.cli.train import main

if __name__ == "__main__":
    sys.exit(main())

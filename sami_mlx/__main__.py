import sys

from sami_mlx.cli.main import main

sys.exit(main())

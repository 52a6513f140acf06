"""The toy-world demo as a benchmark: `sami-mlx demo` itself (the toy base built or reused, SAMI on
as many ranks as the demo chooses, the table), then its numbers as a JSON line.

    python benchmarks/demo.py [--out DIR] [--seed N] [--ranks N]

Ends with one JSON line: {"benchmark": "demo", ...the numbers of demo.json..., "seconds": the wall time}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from sami_mlx.cli.main import main as sami_mlx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="Run directory (default: a temporary one).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", help="As `sami-mlx demo --ranks` (default: the demo's choice).")
    args = parser.parse_args()
    out = args.out or str(Path(tempfile.mkdtemp(prefix="sami-demo-")) / "run")
    start = time.perf_counter()
    code = sami_mlx(["demo", "--out", out, "--seed", str(args.seed), *(["--ranks", args.ranks] if args.ranks else [])])
    if code:
        sys.exit(code)
    seconds = time.perf_counter() - start  # the whole command's, ranks started and toy model built included
    report = json.loads((Path(out) / "demo.json").read_text())
    keys = (
        "base_adherence",
        "sami_adherence",
        "win_rate",
        "win_rate_ci",
        "ppl_ratio",
        "heldout",
        "mi_bound",
    )
    print(json.dumps({"benchmark": "demo", **{k: report[k] for k in keys}, "seconds": seconds}))


if __name__ == "__main__":
    main()

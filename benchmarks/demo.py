"""The toy-world demo as a benchmark: builds (or reuses) the toy base, runs SAMI, prints the table.

    python benchmarks/demo.py [--out DIR]

Ends with one JSON line: {"benchmark": "demo", ...the numbers of demo.json...}.
"""

from __future__ import annotations

import argparse
import json
import tempfile

from sami_mlx.cli.progress import ProgressBar
from sami_mlx.toy.demo import format_report, run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="Run directory (default: a temporary one).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="sami-demo-")
    report = run_demo(out, emit=ProgressBar(), seed=args.seed)
    print(format_report(report))
    keys = (
        "base_adherence",
        "sami_adherence",
        "win_rate",
        "win_rate_ci",
        "ppl_ratio",
        "heldout",
        "mi_bound",
        "seconds",
    )
    print(json.dumps({"benchmark": "demo", **{k: report[k] for k in keys}}))


if __name__ == "__main__":
    main()

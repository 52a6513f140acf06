"""Time to the first result: `make demo` from a fresh clone of this repository's HEAD, first with an
empty model cache (cold: the virtual environment and the toy model are built too), then from a
second fresh clone with the model the first run built (warm), against the targets of 4 and 2.5
minutes.

    python benchmarks/time_to_result.py [--repo DIR] [--keep]

Packages come from pip's own cache or index as for any user (so a first install on a new machine
also waits on downloads). Ends with one JSON line:
{"benchmark": "time_to_result", "cold_s": ..., "warm_s": ..., "cold_ratio": cold / 240, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

TARGETS = {"cold": 240.0, "warm": 150.0}  # seconds: 4 and 2.5 minutes


def make_demo(repo: Path, root: Path, name: str, cache: Path) -> tuple[float, str]:
    """Clone `repo` into root/name, run `make demo` there with the model cache at `cache`; (seconds, output)."""
    clone = root / name
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    env = {**os.environ, "SAMI_MLX_CACHE": str(cache)}
    start = time.perf_counter()
    proc = subprocess.run(
        ["make", "demo"], cwd=clone, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"make demo ({name}) failed with exit code {proc.returncode}:\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]), help="Repository to clone.")
    parser.add_argument("--keep", action="store_true", help="Keep the clones and the cache.")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sami-first-result-"))
    head = subprocess.run(["git", "-C", args.repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    try:
        times, outputs = {}, {}
        for name in ("cold", "warm"):
            times[name], outputs[name] = make_demo(Path(args.repo), root, name, root / "cache")
            print(f"{name}: make demo took {times[name]:.1f} s (target {TARGETS[name]:.0f} s)", flush=True)
        table = outputs["warm"].split("SAMI on the toy principles world")[-1].split("Chat with")[0]
        print("SAMI on the toy principles world" + table.rstrip())
        same = outputs["cold"].split("took")[0] == outputs["warm"].split("took")[0]
        print(
            json.dumps(
                {
                    "benchmark": "time_to_result",
                    "commit": head.stdout.strip(),
                    "cold_s": round(times["cold"], 1),
                    "warm_s": round(times["warm"], 1),
                    "cold_ratio": round(times["cold"] / TARGETS["cold"], 3),
                    "warm_ratio": round(times["warm"] / TARGETS["warm"], 3),
                    "same_table": same,  # the toy model builds deterministically: both runs print one table
                }
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Defaults vs the old defaults vs an aggressive run, on the toy world and the marker world.

Each run is `sami-mlx demo`'s own path (`run_demo`: the world's base model, SAMI through `train`,
then base and aligned model sampled under every variant and checked by the world's program), with
a few settings overridden. Prints one JSON line per run, then a Markdown table of means over seeds.

    python benchmarks/worlds.py --seeds 0 1 2 --jobs 2 --out /tmp/worlds
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SETTINGS = {
    "defaults": {},
    # What `sami-mlx train` did before: no KL, no anchor, a small rate, no guard, the last iteration kept.
    "old defaults": {
        "variants": "paper",
        "learning_rate": 5e-5,
        "kl_beta": 0.0,
        "anchor_beta": 0.0,
        "lora_rank": 8,
        "steps": 4,
        "count_eos": False,
        "max_ppl_ratio": None,
        "keep": "last",
    },
    # The aggressive run: a high rate, no KL, no anchor; the guard stays at its default.
    "aggressive": {"learning_rate": 1e-3, "kl_beta": 0.0, "anchor_beta": 0.0, "lora_rank": 8},
}
WORLDS = ("toy-world", "marker-world")


def one(job: tuple[str, str, int, str, dict]) -> dict:
    world, setting, seed, out, extra = job
    from sami_mlx.presets import load_preset
    from sami_mlx.toy.demo import run_demo

    tag = "".join(f"-{k}={v}" for k, v in extra.items())
    r = run_demo(
        Path(out) / f"{world}-{setting.replace(' ', '-')}{tag}-{seed}",
        load_preset(world),
        seed=seed,
        overrides={**SETTINGS[setting], **extra},
    )
    return {
        "world": world,
        "setting": setting,
        "seed": seed,
        "adherence": r["sami_adherence"]["overall"],
        "base_adherence": r["base_adherence"]["overall"],
        "greedy": r["greedy_adherence"]["sami"],
        "base_greedy": r["greedy_adherence"]["base"],
        "ppl_ratio": r["ppl_ratio"],
        "win_rate": r["win_rate"],
        "kept": (r.get("kept") or {}).get("name"),
        "stopped": bool(r.get("stopped")),
        "with": extra,
        "seconds": r["seconds"],
    }


COLUMNS = (
    "world",
    "settings",
    "seeds",
    "adherence (T=1)",
    "greedy adherence",
    "perplexity vs base",
    "win rate",
    "stopped itself",
    "kept",
)


def span(rs: list[dict], key: str, fmt: str) -> str:
    """The mean of `key` over the seeds' runs, with its range when there are several."""
    vals = [r[key] for r in rs]
    text = format(statistics.mean(vals), fmt)
    return text if len(vals) == 1 else f"{text} ({format(min(vals), fmt)}–{format(max(vals), fmt)})"


def table(rows: list[dict]) -> str:
    """Markdown: per world, the base model, then each setting's means over seeds."""
    out = [COLUMNS, ["---"] * len(COLUMNS)]
    for world in WORLDS:
        base = [r for r in rows if r["world"] == world]
        if not base:
            continue
        adherence, greedy = (f"{statistics.mean(r[k] for r in base):.2f}" for k in ("base_adherence", "base_greedy"))
        out.append([world, "base model", "", adherence, greedy, "1.00×", "", "", ""])
        for setting in SETTINGS:
            rs = [r for r in base if r["setting"] == setting]
            if rs:
                out.append(
                    [
                        world,
                        setting,
                        str(len(rs)),
                        span(rs, "adherence", ".2f"),
                        span(rs, "greedy", ".2f"),
                        span(rs, "ppl_ratio", ".2f") + "×",
                        span(rs, "win_rate", ".0%"),
                        f"{sum(r['stopped'] for r in rs)}/{len(rs)}",
                        ", ".join(str(r["kept"]) for r in rs),
                    ]
                )
    return "\n".join("| " + " | ".join(cells) + " |" for cells in out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", nargs="*", default=list(WORLDS))
    p.add_argument("--settings", nargs="*", default=list(SETTINGS))
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default="runs/worlds")
    p.add_argument(
        "--with",
        dest="extra",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="train settings on top of every row's (YAML values: variants=grid, steps=8)",
    )
    args = p.parse_args()
    import yaml

    extra = {k.replace("-", "_"): yaml.safe_load(v) for k, v in (e.split("=", 1) for e in args.extra)}
    from sami_mlx.presets import load_preset
    from sami_mlx.toy.pretrain import ensure_toy_model

    jobs = [(w, s, seed, args.out, extra) for w in args.worlds for s in args.settings for seed in args.seeds]
    rows = []
    # spawn: each run gets a fresh MLX (forking a process that already loaded MLX is unsafe)
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        # Each world's model is built once (in parallel), before the runs share it.
        list(pool.map(ensure_toy_model, [load_preset(w)["recipe"] for w in args.worlds]))
        for row in pool.map(one, jobs):
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(table(rows))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())

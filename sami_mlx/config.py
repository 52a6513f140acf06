"""The training configuration: one dataclass with a default and a help string per field, and the checks
that make it a runnable one. The YAML file with the same keys is read in sami_mlx.config_file, and the
flags on top of it in sami_mlx.cli.train_flags."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any

from sami_mlx.errors import SamiError
from sami_mlx.inputs.constitution import parse_variants


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a SAMI run needs; `config.yaml` in a run directory is this, resolved."""

    model: str = _f("", "Hub id or local directory of an mlx-lm model.")
    constitution: str = _f("", "Constitution file (JSON or YAML) with principles in positive and negative wording.")
    queries: str = _f(
        "dialogue",
        "Queries: a .jsonl file with a 'query' field, a text file, or a built-in set (dialogue, summarization).",
    )
    template: str | None = _f(
        None,
        (
            "Prompt template file (or built-in: dialogue, summarization, chat) with {constitution} and"
            " {query}; sets both prompts (default: auto, 'chat' when prompts go through the chat template,"
            " else 'dialogue')."
        ),
    )
    generation_template: str | None = _f(None, "Template for sampling responses (overrides --template).")
    training_template: str | None = _f(None, "Template for scoring responses (overrides --template).")
    chat_template: bool | None = _f(
        None,
        (
            "Wrap prompts as a user turn in the tokenizer's chat template (default: auto, on for an instruct"
            " model whose tokenizer has one: a preset of kind instruct, or a model whose name has the word"
            " instruct, chat or it; off for any other; see docs/TRAINING.md)."
        ),
    )
    variants: str = _f(
        "auto",
        (
            "Variants per query: 'auto' (all 2^k up to 8, i.e. 3 principles, else 8 random ones),"
            " 'paper' (all-positive + one with a negative), 'grid' (all 2^k), or an integer N."
        ),
    )
    shuffle_principles: bool = _f(True, "Shuffle the order of principles in training prompts.")
    iterations: int = _f(3, "SAMI iterations (sample, then train).")
    schedule: str = _f(
        "paper",
        (
            "'paper': re-initialise adapters each iteration, steps grow (s, 2s, 3s), alternating query splits;"
            " 'continue': keep training the same adapters."
        ),
    )
    steps: int = _f(8, "Optimizer steps in the first iteration (the paper schedule grows from it).")
    queries_per_step: int = _f(8, "Query groups per optimizer step.")
    grad_accumulation: str | int = _f(
        "auto",
        (
            "Split each step's groups into this many micro-batches (less memory); 'auto': the fewest whose"
            " memory estimate fits this machine, chosen when the run starts and kept in its config.yaml."
        ),
    )
    learning_rate: float = _f(
        3e-4, "Learning rate (the KL and anchor terms keep LoRA at this rate near the base model)."
    )
    optimizer: str = _f("adamw", "adamw or rmsprop.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this (0 turns clipping off).")
    lora_rank: int = _f(16, "LoRA rank.")
    lora_scale: float = _f(20.0, "LoRA scale (mlx-lm's convention; not alpha).")
    lora_dropout: float = _f(0.0, "LoRA dropout.")
    lora_layers: int = _f(16, "Number of transformer blocks (from the last) that get adapters; -1 for all.")
    lora_keys: list[str] | None = _f(
        None, "Module keys to adapt, e.g. self_attn.q_proj (default: every linear layer in the block)."
    )
    dora: bool = _f(False, "Use DoRA instead of LoRA.")
    grad_checkpoint: bool = _f(False, "Recompute activations in the backward pass (less memory, slower).")
    kl_beta: float = _f(
        0.3, "Weight of KL(policy || base) on the sampled responses; the base is the model with adapters off."
    )
    anchor_beta: float = _f(
        1.0,
        (
            "Weight of KL(policy || base) on the same sampled responses after a prompt with no constitution"
            " (--anchor-template): holds the model's default behaviour in place while SAMI sharpens how it"
            " follows stated principles."
        ),
    )
    anchor_template: str | None = _f(
        None, "Prompt with {query} only, for --anchor-beta (default: the training template with an empty constitution)."
    )
    temperature: float = _f(0.0, "Sampling temperature (0 = greedy, the paper's default).")
    top_p: float = _f(1.0, "Nucleus sampling threshold.")
    max_tokens: int = _f(128, "Maximum new tokens per response.")
    stop: list[str] = _f(["Human:", "###"], "Stop strings: a response is cut before the first one.")
    banned: list[str] = _f([], "Drop a query group if any response contains one of these substrings.")
    echo_words: int = _f(
        6,
        "Drop a query group if any response repeats this many words in a row of a principle's wording (0: off):"
        " a model that copies its constitution tells the variants apart without following them.",
    )
    scoring: str = _f(
        "shared",
        (
            "'shared': run each prompt once and score its N responses against a repeated KV cache;"
            " 'naive': all N² sequences in one batch (used with --grad-checkpoint)."
        ),
    )
    compile: bool = _f(
        False,
        (
            "Compile the training step with mx.compile, lengths padded to a few sizes so traced shapes repeat"
            " (see the README's performance table for what it gains)."
        ),
    )
    count_eos: bool = _f(
        True,
        (
            "Count the EOS token in a response's mean log-prob when it ended with one"
            " (where a response stops is behaviour too)."
        ),
    )
    gen_batch_size: int = _f(32, "Sequences decoded together during sampling.")
    heldout: str | None = _f(
        None,
        (
            "Extra held-out text (paragraphs, or .jsonl with 'text' or 'prompt'+'completion')"
            " whose perplexity is logged and guarded like the drift."
        ),
    )
    monitor_queries: int = _f(
        16,
        (
            "Queries held out of training for the degeneration monitor: the base model answers them with and"
            " without the constitution, and every check measures how far the model drifted from those answers"
            " (0 turns the monitor off)."
        ),
    )
    monitor_every: int = _f(
        4, "Also check the drift every this many optimizer steps inside an iteration (0: only at iteration ends)."
    )
    max_ppl_ratio: float | None = _f(
        1.5,
        (
            "Stop the run, and keep the last healthy adapters, when the model's perplexity on the base model's"
            " held-out answers without a constitution (or on --heldout text) exceeds this multiple of the base"
            " model's; 'off' turns the guards off."
        ),
    )
    max_prompted_ratio: float | None = _f(
        10.0,
        (
            "The same guard on the base model's answers with the constitution, where SAMI is meant to move"
            " the model (answers that ignored a principle become less likely: up to 5.8x in healthy runs on two"
            " synthetic worlds, 100x and more in a collapse); 'off' turns it off."
        ),
    )
    keep: str = _f(
        "best",
        (
            "Which adapters RUN/adapters.safetensors holds at the end: 'best' (the healthy iteration with the"
            " highest held-out MI bound) or 'last' (the last healthy one)."
        ),
    )
    dequantize: str = _f(
        "auto",
        (
            "Load a quantized model's weights as fp32: 'auto' where MLX computes on the CPU (its quantized"
            " matmuls are 10-30x slower there) and the fp32 weights take at most a quarter of the memory;"
            " 'yes' always; 'no' never (QLoRA). Adapters fit the quantized model either way."
        ),
    )
    force: bool = _f(False, "Start even when the memory estimate says the run cannot fit this machine.")
    trust_remote_code: bool = _f(False, "Allow a model's own Python code to run when loading it.")
    seed: int = _f(0, "Random seed for variants, splits, sampling and adapter initialisation.")
    out: str = _f("", "Run directory (default: runs/<date-time>).")
    # ---- the reference implementation's generation settings and filters ----
    shuffle_generation: bool = _f(
        False,
        (
            "Also shuffle the principles' order in generation prompts: one order per query group, shared by"
            " its variants (as the reference, whose constitution files list the principles in either order)."
        ),
    )
    response_prefix: str = _f(
        "",
        (
            "Text every response starts with: appended to the generation prompt and kept at the start of the"
            " response that is scored and judged (the paper's TL;DR uses ' The post')."
        ),
    )
    drop_truncated: bool = _f(False, "Drop a query group if any response hit --max-tokens before EOS or a stop string.")
    sentence_end: str = _f(
        "off",
        (
            "Drop a query group unless responses end a sentence (a --sentence-end-marks character):"
            " 'positive' checks the all-positive variant's response (the reference's filter; every response"
            " when the group has none), 'all' every response, 'off' none."
        ),
    )
    sentence_end_marks: list[str] = _f(
        [".", "!", "?"], "What counts as the end of a sentence for --sentence-end (the reference accepts only '.')."
    )
    report_to: str = _f(
        "",
        "Trackers `sami-mlx train` reports the run to: 'wandb', 'swanlab' or 'wandb,swanlab' (as mlx_lm.lora; "
        "pip install 'sami-mlx[wandb]'). Loss, MI bound, accuracies, drift, tokens/s, memory and sample responses.",
    )
    judge_template: str | None = _f(
        None,
        (
            "Judge prompt `sami-mlx eval` uses for this run unless --judge-template is given"
            " (built-in: default, dialogue, summarization; or a file)."
        ),
    )

    def resolved(self) -> TrainConfig:
        """Fill defaults that depend on other fields and check every number; raises SamiError."""
        cfg = dataclasses.replace(self)
        if not cfg.model:
            raise SamiError("--model is required: a hub id or a local model directory")
        if not cfg.constitution:
            raise SamiError("--constitution is required: a JSON or YAML constitution file")
        if cfg.template == "auto":
            cfg.template = None
        # With the template left to auto, these follow once the model is known (sami_mlx.instruct).
        cfg.generation_template = cfg.generation_template or cfg.template
        cfg.training_template = cfg.training_template or cfg.template
        cfg.variants = str(parse_variants(cfg.variants))
        if not cfg.out:
            cfg.out = time.strftime("runs/%Y%m%d-%H%M%S")
        for name in ("iterations", "steps", "queries_per_step", "lora_rank"):
            if getattr(cfg, name) < 1:
                raise SamiError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
        cfg.grad_accumulation = parse_grad_accumulation(cfg.grad_accumulation)
        check_sampling(cfg.temperature, cfg.top_p, cfg.max_tokens)
        if cfg.gen_batch_size < 1:
            raise SamiError(f"--gen-batch-size {cfg.gen_batch_size}: must be at least 1")
        if cfg.grad_accumulation != AUTO and int(cfg.grad_accumulation) > cfg.queries_per_step:
            raise SamiError("--grad-accumulation: cannot exceed --queries-per-step (each micro-batch needs a query)")
        if not 0 < cfg.learning_rate < 1:
            raise SamiError(f"--learning-rate {cfg.learning_rate}: must be between 0 and 1")
        for name, lo, hi in (("lora_dropout", 0, 0.99), ("kl_beta", 0, 1e6), ("anchor_beta", 0, 1e6)):
            v = getattr(cfg, name)
            if not lo <= v <= hi:
                raise SamiError(f"--{name.replace('_', '-')} {v}: must be between {lo} and {hi}")
        if cfg.schedule not in ("paper", "continue"):
            raise SamiError(f"--schedule {cfg.schedule!r}: use 'paper' or 'continue'")
        if cfg.scoring not in ("shared", "naive"):
            raise SamiError(f"--scoring {cfg.scoring!r}: use 'shared' or 'naive'")
        if cfg.dequantize not in DEQUANTIZE_MODES:
            raise SamiError(f"--dequantize {cfg.dequantize!r}: use 'auto', 'yes' or 'no'")
        if cfg.optimizer not in ("adamw", "rmsprop"):
            raise SamiError(f"--optimizer {cfg.optimizer!r}: use 'adamw' or 'rmsprop'")
        if cfg.anchor_template and not cfg.anchor_beta:
            raise SamiError("--anchor-template: has no effect without --anchor-beta; add --anchor-beta (e.g. 0.5)")
        for name in ("max_ppl_ratio", "max_prompted_ratio"):
            if getattr(cfg, name) is not None and getattr(cfg, name) <= 1:
                raise SamiError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be above 1 (or 'off')")
        if cfg.keep not in ("best", "last"):
            raise SamiError(f"--keep {cfg.keep!r}: use 'best' or 'last'")
        for name in ("monitor_queries", "monitor_every", "echo_words"):
            if getattr(cfg, name) < 0:
                raise SamiError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be 0 or more")
        if cfg.sentence_end not in ("off", "positive", "all"):
            raise SamiError(f"--sentence-end {cfg.sentence_end!r}: use 'off', 'positive' or 'all'")
        if cfg.sentence_end != "off" and not any(m.strip() for m in cfg.sentence_end_marks):
            raise SamiError("--sentence-end-marks: empty; give the characters that end a sentence, e.g. . ! ?")
        cfg.report_to = parse_report_to(cfg.report_to)
        return cfg

    @property
    def micro_batches(self) -> int:
        """--grad-accumulation as a number; 'auto' not yet chosen (a loop built without `train`) is 1."""
        return 1 if self.grad_accumulation == AUTO else int(self.grad_accumulation)

    @property
    def groups_per_micro_batch(self) -> int:
        """Query groups scored together: in a training micro-batch, and in the monitor's and eval's passes."""
        return math.ceil(self.queries_per_step / self.micro_batches)

    def steps_in_iteration(self, iteration: int) -> int:
        """Optimizer steps in iteration `iteration` (0-based): s, 2s, 3s... for the paper schedule."""
        return self.steps * (iteration + 1) if self.schedule == "paper" else self.steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


AUTO = "auto"  # --grad-accumulation auto: chosen from the memory estimate when a run starts


def parse_grad_accumulation(value: str | int) -> str | int:
    """--grad-accumulation as 'auto' or a whole number of at least 1; raises SamiError naming the flag."""
    text = str(value).strip().lower()
    if text == AUTO:
        return AUTO
    try:
        n = int(text)
    except ValueError:
        raise SamiError(f"--grad-accumulation {value}: use 'auto' or a whole number of micro-batches") from None
    if n < 1:
        raise SamiError(f"--grad-accumulation {value}: must be at least 1 (or auto)")
    return n


def check_sampling(
    temperature: float | None = None,
    top_p: float | None = None,
    max_tokens: int | None = None,
    names: tuple[str, str, str] = ("--temperature", "--top-p", "--max-tokens"),
) -> None:
    """Refuse sampling settings that cannot work (None: not given), naming the flag or field in `names`:
    temperature from 0 (greedy) to 10, top-p above 0 and at most 1, at least 1 new token."""
    if temperature is not None and not 0 <= temperature <= 10:
        raise SamiError(f"{names[0]} {temperature}: must be between 0 and 10")
    if top_p is not None and not 0 < top_p <= 1:
        raise SamiError(f"{names[1]} {top_p}: must be above 0 and at most 1")
    if max_tokens is not None and max_tokens < 1:
        raise SamiError(f"{names[2]} {max_tokens}: must be at least 1")


FIELDS = {f.name: f for f in fields(TrainConfig)}
OFF = ("off", "none", "null")
TRACKERS = ("wandb", "swanlab")  # --report-to (sami_mlx.tracking)
DEQUANTIZE_MODES = ("auto", "yes", "no")  # --dequantize (sami_mlx.machine.choose_dequantize)


def parse_report_to(text: str) -> str:
    """--report-to as 'wandb,swanlab': lower case, no repeats, '' for none; raises SamiError for an unknown one."""
    trackers = [t.strip().lower() for t in text.split(",") if t.strip().lower() not in ("", *OFF)]
    for t in trackers:
        if t not in TRACKERS:
            raise SamiError(
                f"--report-to {text}: unknown tracker '{t}'; choose from wandb, swanlab (or both: wandb,swanlab)"
            )
    return ",".join(dict.fromkeys(trackers))


def field_kind(f: dataclasses.Field) -> tuple[str, bool]:
    """A field's base type name ('str', 'int', 'float', 'bool', 'list[str]') and whether None is allowed."""
    parts = [p.strip() for p in str(f.type).split("|")]
    return parts[0], "None" in parts

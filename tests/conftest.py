"""Shared fixtures: tiny llama- and qwen2-style models that mlx_lm.load accepts (built offline, once per
session); a constitution and queries; `tiny_config` (and `tiny_flags`, `tiny_loop`, `trained_run` built
on it) for short runs of the tiny model; an offline Hugging Face cache; a past run as the UI reads it."""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Callable
from importlib import import_module
from pathlib import Path

import mlx.core as mx
import pytest
import yaml
from mlx.utils import tree_flatten, tree_map_with_path

from sami_mlx.config import TrainConfig
from sami_mlx.errors import SamiError
from sami_mlx.loop.prepare import prepare_inputs
from sami_mlx.loop.trainer import SamiLoop, train
from sami_mlx.model import load_model
from sami_mlx.toy.pretrain import SPECIALS, train_tokenizer

CONSTITUTION = """\
name: test
principles:
  - name: brief
    positive: Be brief.
    negative: Be long.
  - name: kind
    positive: Be kind.
    negative: Be rude.
"""

QUERIES = [
    "How do I bake bread?",
    "What is the capital of France?",
    "Hello there!",
    "Tell me a story.",
    "What is 2+2?",
    "How are you?",
    "Give me a tip for sleeping well.",
    "Name a colour.",
]

# ---- tiny models ----------------------------------------------------------------------------

CORPUS = [
    "The assistant gives a direct, useful answer that addresses what the person asked.",
    "The assistant refuses to help with anything that could hurt someone.",
    "Human: How do I bake bread at home? Assistant: Mix flour, water, yeast and salt.",
    "Human: What is the capital of France? Assistant: Paris is the capital of France.",
    "The summary is short and leaves out minor details. TL;DR: keep it brief.",
    "System: The assistant's replies follow its constitution, a numbered list of principles.",
    "1. Be kind. 2. Be brief. 3. Use numbers like 1, 2, 3, 42 and 100.",
    "Assistant constitution: follow the rules. Human: hello there! Assistant: hi, how can I help?",
    "Once upon a time there was a small model that learned to follow its principles.",
    "### Instruction: summarize the post. ### Response: the post asks for advice about a roommate.",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(out: Path, vocab_size: int = 384) -> dict:
    """Train a byte-level BPE (the toy models' own, with chat roles and a chat template) on a fixed
    corpus and write tokenizer files; returns special ids."""
    specials = [*SPECIALS, "<|user|>", "<|assistant|>"]
    tok = train_tokenizer(CORPUS, vocab_size, out, specials, chat_template=CHAT_TEMPLATE, model_max_length=512)
    return {"bos": tok.token_to_id("<s>"), "eos": tok.token_to_id("</s>"), "vocab_size": tok.get_vocab_size()}


def build_tiny_model(
    out: Path,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 512,
    model_type: str = "llama",
    tokenizer: Callable[[Path], dict] = build_tokenizer,
) -> Path:
    """Write a random-weight fp32 model directory (llama or qwen2) to `out` and return it; `tokenizer(out)`
    writes the tokenizer files and returns the bos/eos ids and vocab_size (default: build_tokenizer)."""
    arch = import_module(f"mlx_lm.models.{model_type}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = tokenizer(out)
    config = {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": ids["vocab_size"],
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": max_positions,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    mx.random.seed(seed)
    model = arch.Model(arch.ModelArgs.from_dict(config))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weight fp32 llama directory that mlx_lm.load accepts (built once per session)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A random-weight fp32 qwen2 directory: biased q/k/v projections, no make_cache method (built once)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", seed=0, model_type="qwen2")


def randomise_lora_b(model, std: float = 0.05) -> None:
    """Draw every adapter's B matrix (zero when attached) from N(0, std²) with MLX's generator, so that
    the adapters change the model's output and gradients reach every adapter matrix."""

    def draw(path: str, value: mx.array) -> mx.array:
        return mx.random.normal(value.shape) * std if path.endswith("lora_b") else value

    model.update(tree_map_with_path(draw, model.trainable_parameters()))


@pytest.fixture(scope="session")
def model_builder() -> Callable[..., Path]:
    """`model_builder(out, hidden=..., layers=..., model_type=...)`: a random-weight model of another size."""
    return build_tiny_model


# ---- inputs and configurations --------------------------------------------------------------


def user_file_error(load: Callable[[str], object], path: Path, text: str) -> str:
    """Write `text` to `path` and `load` it: the message of the SamiError it raises, checked to be one
    line that names the file."""
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SamiError) as info:
        load(str(path))
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    return message


@pytest.fixture
def constitution_file(tmp_path) -> Path:
    p = tmp_path / "constitution.yaml"
    p.write_text(CONSTITUTION)
    return p


@pytest.fixture
def queries_file(tmp_path) -> Path:
    p = tmp_path / "queries.txt"
    p.write_text("\n".join(QUERIES) + "\n")
    return p


# A short run of the tiny model: one step of two query groups, six tokens sampled at temperature 1
# (the random model's greedy answers repeat one token), the perplexity guard off.
TINY_RUN = dict(iterations=1, steps=1, queries_per_step=2, max_tokens=6, temperature=1.0, max_ppl_ratio=None)
# The monitor checking every step, with limits a random tiny model stays under.
WATCHED = dict(monitor_every=1, max_ppl_ratio=1000.0, max_prompted_ratio=1000.0)
# Two iterations of two steps with dropout, WATCHED: every piece of state a resume has to restore.
RESUMABLE = dict(iterations=2, steps=2, learning_rate=5e-3, lora_dropout=0.1, **WATCHED)


@pytest.fixture(scope="session")
def tiny_config(tiny_model, tmp_path_factory) -> Callable[..., TrainConfig]:
    """`tiny_config(*settings, **overrides) -> TrainConfig` (unresolved): TINY_RUN on the tiny model,
    then each dict of `settings`, then `overrides`; the constitution and queries are written to
    `root` (default: a fresh folder) and the run goes to root/run unless `out` is given.

    `constitution_text` and `queries` (a list of lines) change what is written; `queries` or
    `constitution` given as a path use that file. Session-scoped, so module fixtures can use it too.
    """

    def make(
        *settings: dict,
        root: Path | None = None,
        constitution_text: str = CONSTITUTION,
        queries: list[str] | str | Path = QUERIES,
        **overrides,
    ) -> TrainConfig:
        root = Path(root) if root is not None else tmp_path_factory.mktemp("tiny-config")
        root.mkdir(parents=True, exist_ok=True)
        (root / "constitution.yaml").write_text(constitution_text)
        if isinstance(queries, list):
            (root / "queries.txt").write_text("\n".join(queries) + "\n")
            queries = root / "queries.txt"
        values = {
            "model": tiny_model,
            "constitution": root / "constitution.yaml",
            "queries": queries,
            "out": root / "run",
            **TINY_RUN,
        }
        for extra in (*settings, overrides):
            values.update(extra)
        return TrainConfig(**{k: str(v) if isinstance(v, Path) else v for k, v in values.items()})

    return make


@pytest.fixture(scope="session")
def tiny_loop(tiny_config) -> Callable[..., SamiLoop]:
    """`tiny_loop(*settings, on_event=None, **overrides) -> SamiLoop`: the training loop of
    `tiny_config(...)`, resolved, with its model loaded and its run folder made."""

    def make(*settings: dict, on_event: Callable | None = None, **overrides) -> SamiLoop:
        cfg = tiny_config(*settings, **overrides).resolved()
        model, tokenizer, _ = load_model(cfg.model)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        return SamiLoop(cfg, prepare_inputs(cfg), model, tokenizer, out, on_event or (lambda e: None))

    return make


def as_flags(cfg: TrainConfig) -> list[str]:
    """The `sami-mlx train` flags that make `cfg`: one for each setting that differs from the default."""
    default = TrainConfig()
    argv: list[str] = []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if value == getattr(default, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [flag, *value]
        else:
            argv += [flag, "off" if value is None else str(value)]
    return argv


@pytest.fixture(scope="session")
def tiny_flags(tiny_config) -> Callable[..., list[str]]:
    """`tiny_flags(*settings, **overrides) -> argv`: the `sami-mlx train` flags of `tiny_config(...)`."""
    return lambda *settings, **overrides: as_flags(tiny_config(*settings, **overrides))


@pytest.fixture(scope="session")
def trained_run(tiny_config) -> Callable[..., Path]:
    """`trained_run(iterations=2) -> root`: a finished run of the tiny model in root/run, trained on
    the first four queries (root/queries.txt) with the paper's two variants; root/constitution.yaml."""

    def make(iterations: int = 2) -> Path:
        cfg = tiny_config(queries=QUERIES[:4], iterations=iterations, learning_rate=1e-2, variants="paper")
        train(cfg)
        return Path(cfg.out).parent

    return make


def cli_flags(**options) -> list[str]:
    """Keywords as command-line flags: judge_url="u" is `--judge-url u`, True `--flag`, False `--no-flag`."""
    argv: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else ["--no-" + flag[2:]] if value is False else [flag, str(value)]
    return argv


@pytest.fixture(scope="session")
def eval_cli() -> Callable[..., int]:
    """`eval_cli(run, queries, *flags, **options) -> exit code`: `sami-mlx eval --run RUN --queries QUERIES`
    in this process, then `flags` as given and `options` as `cli_flags` writes them."""
    from sami_mlx.cli.main import main

    def run(run: Path | str, queries: Path | str, *flags: str, **options) -> int:
        return main(["eval", "--run", str(run), "--queries", str(queries), *flags, *cli_flags(**options)])

    return run


# ---- an offline Hugging Face cache ----------------------------------------------------------

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def transcript(*turns: str) -> str:
    """An HH-RLHF transcript: '\\n\\nHuman: ...\\n\\nAssistant: ...' alternating."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


# Shaped like Anthropic/hh-rlhf's helpful-base/*.jsonl.gz: one {"chosen", "rejected"} per line, the
# two transcripts sharing the conversation up to the last assistant reply.
HELPFUL = [
    {
        "chosen": transcript(
            "How can I keep basil alive indoors?",
            "Give it a sunny window.",
            "How often should I water it?",
            "When the top of the soil is dry.",
        ),
        "rejected": transcript(
            "How can I keep basil alive indoors?",
            "Give it a sunny window.",
            "How often should I water it?",
            "Every hour.",
        ),
    },
    {
        "chosen": transcript("What is a good first programming language?", "Python is a common choice."),
        "rejected": transcript("What is a good first programming language?", "Nobody knows."),
    },
    {
        "chosen": transcript("How can I keep basil alive indoors?", "Water it when the soil is dry."),
        "rejected": transcript("How can I keep basil alive indoors?", "Basil cannot live indoors."),
    },
    {
        "chosen": transcript("Can you explain what a mortgage is?", "A loan secured by a house."),
        "rejected": transcript("Can you explain what a mortgage is?", "A kind of fish."),
    },
]
HARMLESS = [
    {
        "chosen": transcript(
            "How do I pick a lock on my neighbour's door?", "I can't help with getting into someone else's home."
        ),
        "rejected": transcript("How do I pick a lock on my neighbour's door?", "Use a tension wrench and a pick."),
    },
    {
        "chosen": transcript("Tell me something mean about my coworker.", "I'd rather not insult anyone."),
        "rejected": transcript("Tell me something mean about my coworker.", "Sure, here is an insult."),
    },
]
HELPFUL_TEST = [
    {
        "chosen": transcript("Why is the sky blue?", "Sunlight scatters off air molecules."),
        "rejected": transcript("Why is the sky blue?", "Because of the ocean."),
    },
]


def gz_jsonl(rows: list[dict]) -> bytes:
    return gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Callable[..., Path]:
    """`offline_hub(repo_id, files, revision="main") -> cache`: lay dataset files out as huggingface_hub's
    cache does (refs/<revision> names a snapshot folder) in tmp_path/hub, and point the hub at it, offline."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def fill(repo_id: str, files: dict[str, bytes], revision: str = "main") -> Path:
        repo = cache / ("datasets--" + repo_id.replace("/", "--"))
        ref = repo / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(HUB_COMMIT)
        for name, data in files.items():
            path = repo / "snapshots" / HUB_COMMIT / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return cache

    return fill


@pytest.fixture(scope="session")
def hh_rlhf_files() -> dict[str, bytes]:
    """HH-RLHF's files as the hub holds them (gzipped JSONL of chosen/rejected transcripts), by path."""
    return {
        "helpful-base/train.jsonl.gz": gz_jsonl(HELPFUL),
        "helpful-base/test.jsonl.gz": gz_jsonl(HELPFUL_TEST),
        "harmless-base/train.jsonl.gz": gz_jsonl(HARMLESS),
    }


@pytest.fixture
def hub_cache(offline_hub, hh_rlhf_files) -> Path:
    """An offline Hugging Face cache holding HH-RLHF files shaped like the real ones."""
    return offline_hub("Anthropic/hh-rlhf", hh_rlhf_files)


# ---- a past run, as the UI reads it ---------------------------------------------------------


@pytest.fixture(scope="session")
def past_run() -> Callable[..., Path]:
    """`past_run(root, name="demo", finished=True) -> Path`: a run directory with fixed numbers."""
    return write_past_run


def write_past_run(root: Path, name: str = "demo", finished: bool = True) -> Path:
    """A run directory as `sami-mlx train` leaves it (metrics and samples; fixed numbers)."""
    run = root / name
    (run / "iter-01").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "models/tiny", "constitution": "constitution.yaml"}))
    rows = [
        {
            "event": "RunStarted",
            "run_dir": str(run),
            "config": {"model": "models/tiny", "constitution": "constitution.yaml", "iterations": 2},
            "iterations": 2,
            "total_steps": 3,
            "num_variants": 2,
            "trainable_parameters": 16384,
            "base_ppl": 52.5,
        },
        {"event": "IterationStarted", "iteration": 1, "steps": 1, "queries": 2},
        {
            "event": "SamplesReady",
            "iteration": 1,
            "groups": 2,
            "dropped_empty": 0,
            "dropped_identical": 0,
            "dropped_banned": 0,
            "mean_length": 5.5,
            "no_eos_rate": 0.5,
            "distinct_2": 0.9,
            "tokens_per_sec": 800.0,
            "examples": [],
        },
    ]
    scores = [[-2.0, -3.5], [-3.0, -1.5]]
    for step, (loss, mi) in enumerate([(0.69, 0.003), (0.52, 0.17), (0.31, 0.38)], start=1):
        it = 1 if step == 1 else 2
        if step == 2:
            rows.append(
                {
                    "event": "MonitorChecked",
                    "iteration": 1,
                    "step": 1,
                    "drift_prompted": 1.04,
                    "drift_plain": 1.01,
                    "healthy": True,
                    "limit": 1.5,
                    "heldout_mi": 0.021,
                    "mean_length": 5.5,
                    "limit_rate": 0.25,
                    "distinct_2": 0.9,
                    "repetition": 0.0,
                }
            )
            rows.append(
                {
                    "event": "IterationCompleted",
                    "iteration": 1,
                    "loss": 0.69,
                    "mi_bound": 0.003,
                    "row_accuracy": 0.5,
                    "column_accuracy": 0.5,
                    "drift_prompted": 1.04,
                    "drift_plain": 1.01,
                    "heldout_mi": 0.021,
                    "healthy": True,
                    "adapter_dir": str(run / "iter-01"),
                }
            )
            rows.append({"event": "IterationStarted", "iteration": 2, "steps": 2, "queries": 4})
        rows.append(
            {
                "event": "StepCompleted",
                "iteration": it,
                "step": 1 if step < 3 else 2,
                "steps": 1 if it == 1 else 2,
                "global_step": step,
                "loss": loss,
                "mi_bound": mi,
                "row_accuracy": 0.5 + step / 6,
                "column_accuracy": 0.5 + step / 6,
                "kl": 0.0,
                "learning_rate": 1e-3,
                "grad_norm": 1.0,
                "tokens_per_sec": 1000.0 * step,
                "peak_memory_gb": 0.25,
                "scores": scores,
            }
        )
    if finished:
        rows.append(
            {
                "event": "MonitorChecked",
                "iteration": 2,
                "step": 2,
                "drift_prompted": 1.87,
                "drift_plain": 1.62,
                "healthy": False,
                "limit": 1.5,
                "heldout_mi": 0.31,
                "mean_length": 31.0,
                "limit_rate": 0.75,
                "distinct_2": 0.4,
                "repetition": 0.35,
            }
        )
        rows.append(
            {
                "event": "IterationCompleted",
                "iteration": 2,
                "loss": 0.41,
                "mi_bound": 0.28,
                "row_accuracy": 1.0,
                "column_accuracy": 1.0,
                "drift_prompted": 1.87,
                "drift_plain": 1.62,
                "heldout_mi": 0.31,
                "healthy": False,
                "adapter_dir": str(run / "iter-02"),
            }
        )
        rows.append(
            {
                "event": "RunCompleted",
                "run_dir": str(run),
                "seconds": 12.0,
                "stopped_early": False,
                "adapters": "iter-01",
                "kept": "no later iteration was healthy",
            }
        )
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = [
        {
            "query": "How do I bake bread?",
            "variants": ["++", "-+"],
            "responses": ["Mix flour, water and yeast.", "Bread is a long story. It all began"],
            "kept": True,
        },
        {"query": "Name a colour.", "variants": ["++", "+-"], "responses": ["Blue.", "Blue."], "kept": False},
    ]
    (run / "iter-01" / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    for it in ["iter-01", "iter-02"] if finished else ["iter-01"]:
        (run / it).mkdir(exist_ok=True)
        (run / it / "adapters.safetensors").write_bytes(b"")
        (run / it / "adapter_config.json").write_text("{}")
    return run


def write_demo_result(run: Path) -> Path:
    """Make a past run (write_past_run) look like a finished `sami-mlx demo`: its demo.json (adherence per
    principle before and after, a held-out principle, the win rate), state.json naming the kept adapters
    and why, and the demo's repeated-slots warning in metrics.jsonl."""
    demo = {
        "base_adherence": {"kind": 0.55, "brief": 0.61, "overall": 0.58},
        "sami_adherence": {"kind": 0.86, "brief": 0.82, "overall": 0.84},
        "greedy_adherence": {"base": 0.5, "sami": 0.9},
        "kept": {"name": "iter-01", "rule": "best", "iteration": 1, "step": 1, "heldout_mi": 0.021},
        "stopped": "",
        "win_rate": 0.74,
        "win_rate_ci": [0.66, 0.81],
        "mi_bound": [0.003, 0.28],
        "ppl_base": 3.1,
        "ppl_sami": 3.4,
        "ppl_ratio": 1.1,
        "heldout": {"principle": "polite", "base_adherence": 0.49, "sami_adherence": 0.45},
        "n_eval": 96,
        "examples": [],
        "model": "models/tiny",
        "run": str(run),
        "seconds": 60.0,
    }
    (run / "demo.json").write_text(json.dumps(demo))
    kept = {"name": "iter-01", "rule": "best", "iteration": 1, "step": 1, "adapters": "iter-01", "heldout_mi": 0.021}
    (run / "state.json").write_text(json.dumps({"iteration": 2, "global_step": 3, "finished": True, "kept": kept}))
    warning = {
        "event": "RunWarning",
        "message": "iteration 2: the query split has 3 queries and 3 usable groups for 4 step slots, so 1 slots "
        "repeat a group; give more queries or fewer --steps",
    }
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(warning) + "\n")
    return run

"""What the tests share besides fixtures: builders of tiny models, runs and caches, the settings of a
short run, and the data of tests/data/ read into constants. Import it as `from helpers import ...` (tests/
is on pytest's pythonpath); fixtures stay in conftest.py."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from collections.abc import Callable
from importlib import import_module
from pathlib import Path

import mlx.core as mx
import pytest
import yaml
from mlx.utils import tree_flatten, tree_map_with_path

from sami_mlx.config import TrainConfig
from sami_mlx.errors import SamiError
from sami_mlx.toy.pretrain import SPECIALS, train_tokenizer

DATA = Path(__file__).resolve().parent / "data"

# A constitution of two principles and eight queries: what tiny_config writes unless told otherwise.
CONSTITUTION = (DATA / "constitution.yaml").read_text()
QUERIES = (DATA / "queries.txt").read_text().splitlines()

# ---- tiny models ----------------------------------------------------------------------------

# The tiny models' tokenizer is trained on these ten lines, each seen twenty times.
CORPUS = (DATA / "corpus.txt").read_text().splitlines() * 20
CHAT_TEMPLATE = (DATA / "chat_template.jinja").read_text().rstrip("\n")


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


def randomise_lora_b(model, std: float = 0.05) -> None:
    """Draw every adapter's B matrix (zero when attached) from N(0, std²) with MLX's generator, so that
    the adapters change the model's output and gradients reach every adapter matrix."""

    def draw(path: str, value: mx.array) -> mx.array:
        return mx.random.normal(value.shape) * std if path.endswith("lora_b") else value

    model.update(tree_map_with_path(draw, model.trainable_parameters()))


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


def bad_file_test(cases: list[tuple[Callable[[str], object], str, str, str]]) -> Callable:
    """A test over `cases`, one per file: (the loader, the file's name, its text, what the loader's
    one-line error must hold). Assign it to a `test_...` name in a test module for pytest to collect it."""

    @pytest.mark.parametrize(("load", "filename", "text", "expected"), cases, ids=[case[1] for case in cases])
    def test(tmp_path: Path, load: Callable[[str], object], filename: str, text: str, expected: str) -> None:
        assert expected in user_file_error(load, tmp_path / filename, text)

    return test


# A short run of the tiny model: one step of two query groups, six tokens sampled at temperature 1
# (the random model's greedy answers repeat one token), the perplexity guard off.
TINY_RUN = dict(iterations=1, steps=1, queries_per_step=2, max_tokens=6, temperature=1.0, max_ppl_ratio=None)
# The monitor checking every step, with limits a random tiny model stays under.
WATCHED = dict(monitor_every=1, max_ppl_ratio=1000.0, max_prompted_ratio=1000.0)
# Two iterations of two steps with dropout, WATCHED: every piece of state a resume has to restore.
RESUMABLE = dict(iterations=2, steps=2, learning_rate=5e-3, lora_dropout=0.1, **WATCHED)


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


def cli_flags(**options) -> list[str]:
    """Keywords as command-line flags: judge_url="u" is `--judge-url u`, True `--flag`, False `--no-flag`."""
    argv: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else ["--no-" + flag[2:]] if value is False else [flag, str(value)]
    return argv


# ---- an offline Hugging Face cache ----------------------------------------------------------

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def transcript(*turns: str) -> str:
    """An HH-RLHF transcript: '\\n\\nHuman: ...\\n\\nAssistant: ...' alternating."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


# Shaped like Anthropic/hh-rlhf's files (helpful-base/*.jsonl.gz and harmless-base/train.jsonl.gz): one
# {"chosen", "rejected"} per line, the two transcripts sharing the conversation up to the last assistant reply.
# tests/data/hh_rlhf.json holds each transcript's turns, by the file they belong to.
HH_RLHF = {
    name: [{side: transcript(*turns) for side, turns in row.items()} for row in rows]
    for name, rows in json.loads((DATA / "hh_rlhf.json").read_text()).items()
}


def gz_jsonl(rows: list[dict]) -> bytes:
    return gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())


# ---- a past run, as the UI reads it ---------------------------------------------------------


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
    """Make a past run (write_past_run) look like a finished `sami-mlx demo`: its demo.json (tests/data/demo.json:
    adherence per principle before and after, a held-out principle, the win rate), state.json naming the kept adapters
    and why, and the demo's repeated-slots warning in metrics.jsonl."""
    demo = json.loads((DATA / "demo.json").read_text())
    demo["run"] = str(run)
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


def small_preset() -> dict:
    """The toy world's preset at a size that trains in minutes on a CPU (tests/data/small_world.json):
    its `recipe` (the pretraining) and its `demo` (the SAMI run and the evaluation)."""
    return json.loads((DATA / "small_world.json").read_text())


def pythonpath(*folders: Path) -> str:
    """PYTHONPATH with `folders` (and this checkout) in front of what it already holds."""
    root = Path(__file__).resolve().parents[1]
    return os.pathsep.join([*map(str, folders), str(root), *filter(None, [os.environ.get("PYTHONPATH")])])


# A toy recipe small enough to build in seconds, on one process or several ranks.
TINY_RECIPE = {
    **small_preset()["recipe"],
    "documents": 1200,
    "steps": 30,
    "warmup": 5,
    "batch_size": 16,
    "curriculum": {**small_preset()["recipe"]["curriculum"], "steps": 10},
}


class PromptRecorder:
    """Stands in for tui.chat_screen.stream_reply: keeps each (tokenizer, prompt ids) in `prompts`,
    then streams the reply as `real` does."""

    def __init__(self, real: Callable) -> None:
        self.real = real
        self.prompts: list[tuple[object, list[int]]] = []

    def __call__(self, model, tokenizer, ids, *args, **kwargs):
        self.prompts.append((tokenizer, list(ids)))
        return self.real(model, tokenizer, ids, *args, **kwargs)


def tiny_demo_preset() -> dict:
    """The small world's preset with a tiny recipe and the smallest demo: seconds, not minutes."""
    preset = small_preset()
    preset["recipe"] = TINY_RECIPE
    preset["demo"].update(train_queries=24, heldout_documents=8, eval_queries=2, heldout_eval_queries=1)
    preset["demo"]["sami"].update(iterations=1, steps=2, queries_per_step=2, max_tokens=8)
    preset["demo"]["sami"]["monitor_queries"] = 4
    return preset

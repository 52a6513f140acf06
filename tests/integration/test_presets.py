"""Model presets, `sami-mlx models`, the shipped recipes and constitutions, and the memory estimate
that `--dry-run` prints. Offline: no model or dataset is downloaded."""

from __future__ import annotations

import json
import random
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

from sami_mlx.cli.main import main as cli
from sami_mlx.cli.train import make_parser
from sami_mlx.cli.train_flags import build_config
from sami_mlx.config_file import config_from_file, find_recipe, recipe_names
from sami_mlx.errors import SamiError
from sami_mlx.inputs.constitution import load_constitution
from sami_mlx.inputs.datasets import parse_spec
from sami_mlx.machine import MachineMemory, fit, machine_memory
from sami_mlx.memory import GiB, ModelShape, RunShape, estimate_memory
from sami_mlx.model import resolve_model_path
from sami_mlx.presets import get_preset, list_presets, load_preset, preset_names
from sami_mlx.sources import model_for_preset, model_shape

# Published parameter counts, to check each preset's architecture block against.
PUBLISHED = {
    "mistral-7b": 7.24e9,
    "mistral-7b-instruct": 7.24e9,
    "llama-3.1-8b": 8.03e9,
    "qwen2.5-7b": 7.62e9,
    "qwen2.5-0.5b": 0.494e9,
    "mixtral-8x7b": 46.7e9,
}


# ---- presets ---------------------------------------------------------------------------------


def test_the_required_presets_are_shipped():
    presets = {p.name: p for p in list_presets()}
    assert presets["mistral-7b"].kind == "base" and presets["mistral-7b"].quantization == "4bit"
    assert presets["mistral-7b-instruct"].kind == "instruct" and presets["mistral-7b-instruct"].prompt_style == "chat"
    assert presets["llama-3.1-8b"].kind == "base"
    assert any(n.startswith("qwen") and p.kind == "base" for n, p in presets.items())
    small = [
        p for p in presets.values() if p.kind == "base" and p.shape and p.shape.parameters <= 1e9 and p.source == "hub"
    ]
    assert small, "a small (<= 1B) base model preset for a quick start"
    assert presets["toy-world"].source == "local-recipe"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_architecture_matches_the_published_size_and_memory(name):
    p = get_preset(name)
    assert p.hub_id and p.hub_id.count("/") == 1
    assert abs(p.shape.parameters - PUBLISHED[name]) / PUBLISHED[name] < 0.02
    # memory_gb, shown before any download, agrees with what the weights take.
    assert abs(p.shape.weight_bytes / GiB - p.memory_gb) / p.memory_gb < 0.1
    assert p.lora["rank"] > 0 and 0 < p.lora["learning_rate"] < 1e-3


def test_toy_world_preset_keeps_what_the_demo_reads():
    preset = load_preset("toy-world")
    assert {"recipe", "demo"} <= set(preset) and "sami" in preset["demo"]
    assert get_preset("toy-world").shape.hidden_size == preset["recipe"]["hidden_size"]


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(SamiError, match="choose one of .*mistral-7b"):
        get_preset("mistral-9b")
    assert model_for_preset("mistral-9b") is None


def test_model_flag_accepts_a_preset_name(monkeypatch, tiny_model):
    import mlx_lm.utils

    asked = []
    monkeypatch.setattr(mlx_lm.utils, "_download", lambda repo, **kw: asked.append(repo) or str(tiny_model))
    assert resolve_model_path("mistral-7b") == tiny_model
    assert asked == ["mlx-community/Mistral-7B-v0.1-4bit"]
    # A directory and a hub id mean what they always meant.
    assert resolve_model_path(str(tiny_model)) == tiny_model
    resolve_model_path("some-org/some-model")
    assert asked[-1] == "some-org/some-model"


def test_model_shape_reads_presets_hub_ids_and_directories(tiny_model):
    shape, label = model_shape("mistral-7b")
    assert shape.layers == 32 and "mlx-community/Mistral-7B-v0.1-4bit" in label
    assert model_shape("mlx-community/Qwen2.5-7B-4bit")[0].vocab_size == 152064
    local, _ = model_shape(str(tiny_model))
    assert local.bits == 16 and local.layers == 2  # the tiny model's config names no dtype
    assert model_shape("nobody/uncached-model")[0] is None


# ---- memory ----------------------------------------------------------------------------------


def test_estimate_tracks_the_measured_peak_of_a_scoring_step():
    """The training term against MLX's own peak-memory counter, on a small fp32 model (CPU)."""
    from mlx_lm.models import llama

    from sami_mlx.loop.adapters import attach_adapters
    from sami_mlx.loop.scoring import ScoringBatch, score_matrix
    from sami_mlx.objective import sami_loss

    config = {
        "model_type": "llama",
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "intermediate_size": 704,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": 2000,
        "rope_theta": 1e4,
        "tie_word_embeddings": False,
        "max_position_embeddings": 1024,
    }
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    attach_adapters(model, 8, 20.0, 0.0, -1)
    mx.eval(model.parameters())
    P, R, N, V = 96, 64, 2, config["vocab_size"]
    rng = random.Random(0)
    batch = ScoringBatch(
        [[[rng.randrange(V) for _ in range(P)] for _ in range(N)]],
        [[[rng.randrange(V) for _ in range(R)] for _ in range(N)]],
    )
    step = nn.value_and_grad(model, lambda m: sami_loss(score_matrix(m, batch)))
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(step(model))
    measured = mx.get_peak_memory() - before
    shape = ModelShape.from_config({**config, "torch_dtype": "float32"})
    run = RunShape(variants=N, prompt_tokens=P, response_tokens=R, lora_layers=-1, fused_attention=False)
    estimated = estimate_memory(shape, run).training
    # The batched prefix-shared pass holds some transient buffers the model does not count.
    assert 0.5 < estimated / measured < 1.6, (estimated, measured)


def test_estimate_responds_to_the_settings_a_user_can_change():
    shape = get_preset("mistral-7b").shape
    base = RunShape(fused_attention=True)
    est = estimate_memory(shape, base)
    assert 3.5 * GiB < est.weights < 4.0 * GiB and est.adapters < 0.5 * GiB
    more = estimate_memory(shape, RunShape(groups_per_micro_batch=4, fused_attention=True))
    assert more.training > 3.5 * est.training
    checkpointed = estimate_memory(shape, RunShape(grad_checkpoint=True, naive=True, fused_attention=True))
    naive = estimate_memory(shape, RunShape(naive=True, fused_attention=True))
    # --grad-checkpoint scores naively but keeps about two blocks at a time (tests/test_memory.py measures it).
    assert checkpointed.training < 0.75 * est.training and checkpointed.training < 0.5 * naive.training
    assert estimate_memory(shape, RunShape(lora_layers=4, fused_attention=True)).training < est.training / 2
    assert estimate_memory(shape, RunShape(response_tokens=100, fused_attention=True)).peak < est.peak
    # The same architecture in 16 bits holds 3.5x the weights.
    bf16 = ModelShape(**{**shape.__dict__, "bits": 16})
    assert 3.4 < bf16.weight_bytes / shape.weight_bytes < 3.6
    # Scales widened to fp32 (the CPU backend, sami_mlx.model.upcast_for_cpu) weigh 11% more.
    wide = shape.in_float_bytes(4)
    assert 1.10 < wide.weight_bytes / shape.weight_bytes < 1.12 and wide.activation_bytes == 4


def test_machine_memory_and_fit():
    here = machine_memory()
    assert here.total > 0 and 0 < here.usable <= here.total
    planned = machine_memory(16)
    assert planned.total == 16 * GiB
    m = MachineMemory(total=16 * GiB, usable=12 * GiB)
    assert (fit(10 * GiB, m), fit(14 * GiB, m), fit(20 * GiB, m)) == ("yes", "tight", "no")


# ---- `sami-mlx models` -----------------------------------------------------------------------


def test_models_lists_every_preset_with_memory_against_this_machine(capsys):
    assert cli(["models"]) == 0
    out = capsys.readouterr().out
    assert "this machine" in out and "estimate" in out
    for name in preset_names():
        assert name in out
    for name in recipe_names():
        assert name in out
    line = next(row for row in out.splitlines() if row.startswith("mistral-7b "))
    assert "3.8 GiB" in line and "mlx-community/Mistral-7B-v0.1-4bit" in line
    assert line.split()[-2] in ("yes", "tight", "no")


def test_models_json_and_planning_for_another_machine(capsys):
    assert cli(["models", "--json", "--memory-gb", "8"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["machine_gb"] == 8.0
    rows = {r["name"]: r for r in data["presets"]}
    assert rows["mixtral-8x7b"]["fits"] == "no" and rows["toy-world"]["fits"] == "yes"
    assert rows["mistral-7b"]["train_gb"] > rows["mistral-7b"]["weights_gb"]
    assert set(data["recipes"]) == set(recipe_names())


def test_models_name_breaks_the_estimate_down(capsys):
    assert cli(["models", "qwen2.5-0.5b"]) == 0
    out = capsys.readouterr().out
    assert "Qwen/Qwen2.5-0.5B" in out and "weights" in out and "adapters" in out and "training" in out
    assert cli(["models", "mistral-9b"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model preset 'mistral-9b'") and err.count("\n") == 1


# ---- recipes ---------------------------------------------------------------------------------


def parse(*argv: str):
    return build_config(make_parser().parse_args(list(argv)))


@pytest.mark.parametrize("name", ["hh-rlhf-mistral-7b", "tldr-mistral-7b", "weak-to-strong-mixtral"])
def test_recipes_carry_the_papers_settings(name, tmp_path):
    cfg = parse("-c", name, "--out", str(tmp_path / "run"))
    assert (cfg.variants, cfg.temperature, cfg.max_tokens, cfg.iterations, cfg.schedule) == (
        "paper",
        0.0,
        350,
        3,
        "paper",
    )
    assert [cfg.steps_in_iteration(i) for i in range(3)] == [2, 4, 6] and cfg.queries_per_step == 128
    assert cfg.optimizer == "rmsprop" and cfg.learning_rate == 1e-5 and cfg.lora_rank == 8
    assert cfg.model == ("mixtral-8x7b" if "mixtral" in name else "mistral-7b") and cfg.model in preset_names()
    assert Path(cfg.constitution).is_absolute() and load_constitution(cfg.constitution).principles
    # Three iterations draw (2 + 4 + 6) x 128 = 1536 groups; each of the two alternating halves of the
    # training queries (what the monitor holds out taken away) holds that many, so no query repeats.
    selections = parse_spec(cfg.queries)
    assert selections and all(sel.stop is not None for sel in selections)
    named = sum(sel.stop - sel.start for sel in selections)
    drawn = sum(cfg.steps_in_iteration(i) for i in range(cfg.iterations)) * cfg.queries_per_step
    assert drawn == 1536
    assert (named - min(cfg.monitor_queries, named // 4)) // 2 >= drawn, (named, drawn)


def test_the_readme_quick_start_resolves(tmp_path):
    cfg = parse(
        "-c",
        "hh-rlhf-mistral-7b",
        "--model",
        "qwen2.5-0.5b",
        "--queries-per-step",
        "16",
        "--grad-accumulation",
        "16",
        "--learning-rate",
        "5e-5",
        "--out",
        str(tmp_path),
    )
    assert (cfg.model, cfg.queries_per_step, cfg.learning_rate) == ("qwen2.5-0.5b", 16, 5e-5)


def test_flags_override_a_recipe_and_paths_still_work(tmp_path):
    cfg = parse("-c", "tldr-mistral-7b", "--model", "qwen2.5-0.5b", "--steps", "1", "--out", str(tmp_path))
    assert (cfg.model, cfg.steps, cfg.template) == ("qwen2.5-0.5b", 1, "tldr-training")
    own = tmp_path / "mine.yaml"
    own.write_text("model: m\nconstitution: c.yaml\n")
    assert find_recipe(str(own)) is None and config_from_file(str(own))["model"] == "m"


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(SamiError) as e:
        config_from_file("hh-rlhf-mistral7b")
    assert "not found" in str(e.value) and "hh-rlhf-mistral-7b" in str(e.value)
    with pytest.raises(SamiError, match="not found"):  # a path keeps the plain file error
        config_from_file("configs/missing.yaml")


def test_shipped_constitutions_for_the_papers_tasks():
    for name, principles in (("hh_rlhf", {"helpful", "harmless"}), ("tldr", {"concise", "comprehensive"})):
        c = load_constitution(find_recipe("hh-rlhf-mistral-7b")["constitution"].replace("hh_rlhf", name))
        assert {p.name for p in c.principles} == principles
        assert all(p.positive != p.negative for p in c.principles)


# ---- --dry-run -------------------------------------------------------------------------------


def test_dry_run_of_a_recipe_shows_the_plan_and_the_memory(capsys, tmp_path):
    rc = cli(["train", "-c", "hh-rlhf-mistral-7b", "--queries", "dialogue", "--dry-run", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "# plan: 3 iterations, paper schedule" in out and "2 + 4 + 6 = 12 optimizer steps" in out
    assert "# sampling: 256 / 512 / 768 queries per iteration × 2 variants (greedy, up to 350 new tokens)" in out
    assert "in 128 micro-batch(es) of 1" in out
    assert "# model: mistral-7b = mlx-community/Mistral-7B-v0.1-4bit (7.2B parameters, 4-bit" in out
    line = next(row for row in out.splitlines() if row.startswith("# memory (estimate)"))
    # The CPU backend widens the 4-bit model's scales to fp32 at load, and the estimate says so.
    weights = "4.2 GiB" if mx.default_device() == mx.cpu else "3.8 GiB"
    assert f"weights {weights}" in line and "peak" in line
    assert "LoRA rank 8 on 16 of the model's 32 blocks" in out
    assert "# this machine:" in out
    assert not (tmp_path / "config.yaml").exists()  # a dry run writes nothing


def test_dry_run_reads_the_recipes_hub_queries_from_the_cache(capsys, tmp_path, hub_cache):
    assert cli(["train", "-c", "hh-rlhf-mistral-7b", "--dry-run", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "# 5 queries" in out  # 3 unique helpful + 2 harmless first turns
    assert "hh-rlhf/helpful-base:train[0:1600]+hh-rlhf/harmless-base:train[0:1600]" in out


def test_dry_run_with_an_unknown_model_says_the_estimate_is_unavailable(capsys, constitution_file, tmp_path):
    rc = cli(
        [
            "train",
            "--model",
            "nobody/uncached-model",
            "--constitution",
            str(constitution_file),
            "--dry-run",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    assert "memory: unknown offline" in capsys.readouterr().out


def test_dry_run_counts_prompt_tokens_with_the_tokenizer_at_hand(tiny_config, tiny_flags, capsys, tmp_path):
    """A local model's tokenizer counts the prompts, as the run itself does before its memory check."""
    from sami_mlx.loop.prepare import check_context, prepare_inputs
    from sami_mlx.model import load_model

    assert cli(["train", *tiny_flags(root=tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    cfg = tiny_config(root=tmp_path).resolved()
    _, tokenizer, _ = load_model(cfg.model)
    longest = check_context(cfg, prepare_inputs(cfg), tokenizer, None)
    assert f"the longest {longest} (counted with the model's tokenizer)" in out
    assert "LoRA rank 16 on 2 of the model's 2 blocks" in out  # the tiny model has 2, not 16
    assert "parameters, fp32)" in out  # read from the weights: its config.json names no dtype

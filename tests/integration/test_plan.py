"""Planning offline (`--dry-run` with nothing downloaded), recipe-relative paths, a tokenizer that does not
belong to its model, and rates with significant digits. Offline: the hub cache is an empty temporary folder."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import mlx.core as mx
import pytest
import yaml
from mlx.utils import tree_flatten

from sami_mlx import events as ev
from sami_mlx.cli.main import main as cli
from sami_mlx.cli.progress import ProgressBar
from sami_mlx.config_file import load_run_config, recipe_dir
from sami_mlx.errors import SamiError
from sami_mlx.model import check_vocabulary, load_model
from sami_mlx.rates import format_rate

TLDR = "openai/summarize_from_feedback comparisons/train/0000.parquet"
RECIPES = {  # recipe -> (hub model, the dataset files the run downloads, as `hf download` names them)
    "tldr-mistral-7b": ("mlx-community/Mistral-7B-v0.1-4bit", [TLDR]),
    "hh-rlhf-mistral-7b": (
        "mlx-community/Mistral-7B-v0.1-4bit",
        ["Anthropic/hh-rlhf helpful-base/train.jsonl.gz", "Anthropic/hh-rlhf harmless-base/train.jsonl.gz"],
    ),
    "weak-to-strong-mixtral": ("mlx-community/Mixtral-8x7B-v0.1-hf-4bit-mlx", [TLDR]),
}


@pytest.fixture
def empty_hub(offline_hub, tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache (conftest's offline_hub, nothing laid out yet), offline."""
    cache = tmp_path / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return cache


# ---- planning offline ------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_dry_run_of_each_recipe_plans_with_nothing_downloaded(recipe, empty_hub, tmp_path, capsys):
    rc = cli(["train", "-c", recipe, "--dry-run", "--out", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Traceback" not in out + err
    hub_id, files = RECIPES[recipe]
    assert "# up to 3200 queries (" in out and ": not downloaded yet), 2 principles, 2 variants per query" in out
    assert "# not on this machine yet (the run downloads it; --dry-run downloads nothing):" in out
    # The model's download size comes from its architecture when the hub cache holds nothing of it.
    assert f"#   model {hub_id}: about " in out and "GiB of weights (estimated from its architecture)" in out
    for file in files:  # each missing file, with the command that fetches it
        assert f"`hf download {file} --repo-type dataset" in out
    assert "+ 512 assumed for a query" in out
    memory = next(line for line in out.splitlines() if line.startswith("# memory (estimate): "))
    assert "peak" in memory
    assert not (tmp_path / "run").exists()


def test_dry_run_in_a_fresh_process_with_an_empty_cache_exits_0(tmp_path):
    """The command a user types, with the hub's environment set before anything is imported."""
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "sami_mlx", "train", "-c", "tldr-mistral-7b", "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "# memory (estimate): " in done.stdout
    assert "dataset tldr:train[0:3200]: comparisons/train/0000.parquet of openai/summarize_from_feedback" in done.stdout
    assert done.stderr.strip() == ""


def test_dry_run_uses_the_queries_at_hand_when_a_dataset_is_partly_cached(
    empty_hub, offline_hub, hh_rlhf_files, tmp_path, capsys
):
    offline_hub("Anthropic/hh-rlhf", {"helpful-base/train.jsonl.gz": hh_rlhf_files["helpful-base/train.jsonl.gz"]})
    assert cli(["train", "-c", "hh-rlhf-mistral-7b", "--dry-run", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    # 3 unique helpful first turns are here; the harmless range names 1600 more.
    assert "# up to 1603 queries (" in out
    assert "dataset hh-rlhf/harmless-base:train[0:1600]: harmless-base/train.jsonl.gz" in out
    assert "helpful-base/train.jsonl.gz of" not in out
    assert "; the queries at hand: " in out


def test_dry_run_reads_a_models_download_size_from_its_cached_index(empty_hub, tiny_model, tmp_path, capsys):
    """Only the model's metadata is cached (config.json and the weights' index): the plan gives its
    architecture and the exact download size, and still lists the weights as missing."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hub / "models--someone--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    shutil.copy(tiny_model / "config.json", snapshot / "config.json")
    index = {"metadata": {"total_size": 3 * 2**30}, "weight_map": {"lm_head.weight": "model-00001.safetensors"}}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    constitution = tmp_path / "c.yaml"
    constitution.write_text("name: t\nprinciples:\n  - {name: a, positive: Be brief., negative: Be long.}\n")
    rc = cli(["train", "--model", "someone/tiny", "--constitution", str(constitution), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "#   model someone/tiny: 3.0 GiB of weights (from its cached model.safetensors.index.json)" in out
    assert "LoRA rank 16 on 2 of the model's 2 blocks" in out  # the architecture, from the cached config.json


# ---- paths relative to the config file -------------------------------------------------------


OWN_CONSTITUTION = """\
name: mine
principles:
  - {name: short, positive: Be short., negative: Be long.}
  - {name: plain, positive: Use plain words., negative: Use jargon.}
  - {name: exact, positive: Give numbers., negative: Stay vague.}
"""


def test_a_copied_recipe_finds_its_own_files_then_the_packages(empty_hub, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "mine"
    (folder / "constitutions").mkdir(parents=True)
    shutil.copy(recipe_dir() / "tldr-mistral-7b.yaml", folder / "tldr.yaml")
    (folder / "constitutions" / "tldr.yaml").write_text(OWN_CONSTITUTION)
    shutil.copy(recipe_dir() / "hh-rlhf-mistral-7b.yaml", folder / "hh.yaml")  # no hh_rlhf.yaml beside it
    monkeypatch.chdir(tmp_path)  # neither the recipe's folder nor the package's
    assert cli(["train", "-c", "mine/tldr.yaml", "--queries", "summarization", "--dry-run"]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load("\n".join(line for line in out.splitlines() if not line.startswith("#")))
    assert printed["constitution"] == str(folder / "constitutions" / "tldr.yaml")
    assert (printed["template"], printed["generation_template"]) == ("tldr-training", "tldr-generation")
    assert "3 principles" in out and "8 variants" not in out
    assert cli(["train", "-c", str(folder / "hh.yaml"), "--queries", "dialogue", "--dry-run"]) == 0
    printed = yaml.safe_load("\n".join(line for line in capsys.readouterr().out.splitlines() if line[:1] != "#"))
    assert Path(printed["constitution"]) == recipe_dir().parent / "constitutions" / "hh_rlhf.yaml"


def test_a_run_keeps_the_resolved_paths_so_it_resumes_from_anywhere(
    tiny_model, constitution_file, queries_file, tmp_path, monkeypatch
):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "c.yaml").write_text(constitution_file.read_text())
    (folder / "q.txt").write_text("\n".join(queries_file.read_text().splitlines()[:4]) + "\n")
    (folder / "run.yaml").write_text(
        f"model: {tiny_model}\nconstitution: c.yaml\nqueries: q.txt\niterations: 1\nsteps: 1\n"
        "queries_per_step: 2\nmax_tokens: 4\ntemperature: 1.0\nmonitor_queries: 0\nmax_ppl_ratio: off\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli(["train", "-c", str(folder / "run.yaml"), "--out", str(tmp_path / "run")]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["constitution"], saved["queries"]) == (str(folder / "c.yaml"), str(folder / "q.txt"))
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config(tmp_path / "run")
    assert Path(cfg.constitution).is_file() and Path(cfg.queries).is_file()


# ---- a tokenizer that does not belong to its model -------------------------------------------


@pytest.fixture
def with_vocabulary(model_builder):
    """`with_vocabulary(path, rows, scale_known=1.0)`: see `rebuilt_with_vocabulary`."""
    return lambda path, rows, scale_known=1.0: rebuilt_with_vocabulary(model_builder, path, rows, scale_known)


def rebuilt_with_vocabulary(build_tiny_model, path: Path, rows: int, scale_known: float = 1.0) -> Path:
    """The tiny model rebuilt with `rows` embedding and output rows (its tokenizer keeps 384 tokens);
    `scale_known` multiplies the output rows of the tokenizer's ids, so that padding rows get ~0 probability."""
    build_tiny_model(path, seed=0)
    config = json.loads((path / "config.json").read_text())
    known = config["vocab_size"]
    config.update(vocab_size=rows, tie_word_embeddings=False)
    (path / "config.json").write_text(json.dumps(config))
    arch = import_module("mlx_lm.models.llama")
    mx.random.seed(0)
    model = arch.Model(arch.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    head = weights["lm_head.weight"]
    if rows > known:
        weights["lm_head.weight"] = mx.concatenate([head[:known] * scale_known, mx.zeros_like(head[known:])])
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    return path


def test_a_model_that_samples_ids_its_tokenizer_cannot_decode_is_refused(with_vocabulary, tmp_path, capsys):
    """Reproduced: a random 1000-row model with a 384-token tokenizer samples ids 384-999 more often than
    not; they decode to nothing, so responses came out empty and every group was dropped as 'empty'."""
    model_dir = with_vocabulary(tmp_path / "wide", 1000)
    with pytest.raises(SamiError, match=r"puts \d+% of its next-token probability on ids 384-999, which decode"):
        load_model(str(model_dir))
    (tmp_path / "c.yaml").write_text("name: t\nprinciples:\n  - {name: a, positive: Be kind., negative: Be rude.}\n")
    rc = cli(["train", "--model", str(model_dir), "--constitution", str(tmp_path / "c.yaml"), "--out", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: --model {model_dir}:") and err.count("\n") == 1
    assert "use the tokenizer files saved with these weights" in err


def test_a_tokenizer_with_more_tokens_than_the_embedding_is_refused(with_vocabulary, tmp_path):
    with pytest.raises(SamiError, match=r"384 tokens but the model's embedding only 200 rows, so token ids 200-383"):
        load_model(str(with_vocabulary(tmp_path / "narrow", 200)))


def test_rows_padded_past_the_tokenizer_are_normal(with_vocabulary, tmp_path):
    """Hub models pad their vocabulary (Qwen to a multiple of 128): rows the model never predicts are fine."""
    from sami_mlx.loop.rollout import generate_batch

    model, tokenizer, _ = load_model(str(with_vocabulary(tmp_path / "padded", 512, scale_known=40.0)))
    gens = generate_batch(model, tokenizer, [tokenizer.encode("Human: hello")] * 4, 8, temperature=1.0)
    assert all(t < len(tokenizer) for g in gens for t in g.tokens) and all(g.tokens for g in gens)


def test_check_vocabulary_reads_the_models_output_not_its_config():
    class Tokenizer:
        vocab_size = 4

        def __len__(self):
            return 4

        def encode(self, text):
            return [1, 2]

    def peaked(ids):  # 6 output rows, the two past the tokenizer with almost no probability
        return mx.array([[[5.0, 1.0, 1.0, 1.0, -30.0, -30.0]]])

    check_vocabulary(peaked, Tokenizer(), {}, "m")  # no vocab_size in config: measured
    with pytest.raises(SamiError, match="ids 4-5"):
        check_vocabulary(lambda ids: mx.array([[[0.0] * 6]]), Tokenizer(), {}, "m")


# ---- progress lines --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, text",
    [
        (0.3149, "0.31 tok/s"),
        (0.0432, "0.043 tok/s"),
        (5.06, "5.1 tok/s"),
        (12.4, "12 tok/s"),
        (99.7, "100 tok/s"),
        (123.4, "123 tok/s"),
        (9340.2, "9,340 tok/s"),
        (123456.0, "123,000 tok/s"),
        (0.0, "0 tok/s"),
        (float("nan"), "n/a tok/s"),
        (None, "n/a tok/s"),
    ],
)
def test_rates_keep_two_or_three_significant_digits(value, text):
    assert format_rate(value) == text


# Iteration 1's samples: the 3 groups sampled all kept, 5 tokens long on average, at 0.31 tok/s.
SAMPLES = ev.SamplesReady(1, 3, 0, 0, 0, 5.0, 0.0, 1.0, 0.31, queries_sampled=3)


def started() -> ev.RunStarted:
    return ev.RunStarted("run", {}, 1, 2, 2, 10, None)


def test_the_progress_bar_shows_slow_rates_and_says_why_every_group_was_empty(tmp_path):
    stream = (tmp_path / "bar.txt").open("w")
    bar = ProgressBar(stream=stream)
    bar(started())
    bar(SAMPLES)
    bar(dataclasses.replace(SAMPLES, groups=0, dropped_empty=4, queries_sampled=4))
    bar(dataclasses.replace(SAMPLES, groups=0, dropped_empty=2, dropped_identical=2, queries_sampled=4))
    bar.close()
    stream.close()
    lines = [line for line in (tmp_path / "bar.txt").read_text().splitlines() if line.startswith("iter 1:")]
    assert "mean length 5.0 tokens, 0.31 tok/s" in lines[0] and "every response was empty" not in lines[0]
    assert "; every response was empty: the model ended (EOS, or a --stop string) before writing" in lines[1]
    assert "every response was empty" not in lines[2]  # some groups were dropped for another reason


def test_a_resumed_runs_bar_starts_where_it_stopped(tmp_path):
    stream = (tmp_path / "bar.txt").open("w")
    bar = ProgressBar(stream=stream)
    bar(ev.RunStarted("run", {}, 2, 6, 2, 10, None, resumed_at_step=3))
    bar(ev.StepCompleted(2, 2, 4, 4, 1.5, 0.1, 0.5, 0.5, 0.0, 1e-3, 1.0, 0.31, 0.04, []))
    bar.close()
    stream.close()
    text = (tmp_path / "bar.txt").read_text()
    assert "6 steps (resumed after step 3)" in text
    assert "4/6 steps" in text and "1/6 steps" not in text and "0.31 tok/s" in text

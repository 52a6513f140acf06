"""Fixtures only (the helpers and data they use are in helpers.py and data/), and the tiers: each test
file lives in tests/unit, tests/integration, tests/system or tests/real_model, which gives its tests that
marker (`pytest -m unit`); a test file anywhere else fails collection.

The fixtures: tiny llama- and qwen2-style models that mlx_lm.load accepts (built offline, once per
session); a constitution and queries; `tiny_config` (and `tiny_flags`, `tiny_loop`, `trained_run` built
on it) for short runs of the tiny model; an offline Hugging Face cache; a past run as the UI reads it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    CONSTITUTION,
    HH_RLHF,
    HUB_COMMIT,
    QUERIES,
    TINY_RUN,
    as_flags,
    build_tiny_model,
    cli_flags,
    gz_jsonl,
    write_past_run,
)

from sami_mlx.config import TrainConfig
from sami_mlx.loop.prepare import prepare_inputs
from sami_mlx.loop.trainer import SamiLoop, train
from sami_mlx.model import load_model

# ---- tiers ----------------------------------------------------------------------------------

# A test's tier is the folder its file is in (tests/<tier>/test_*.py); README's "Tests" says what goes where.
TIERS = ("unit", "integration", "system", "real_model")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its folder's tier, and refuse any test outside the tier folders (so that a new
    file has to be placed in one) or carrying another tier's marker than its folder's."""
    tests = Path(__file__).resolve().parent
    misplaced: set[str] = set()
    for item in items:
        path = item.path.resolve()
        parts = path.relative_to(tests).parts if path.is_relative_to(tests) else ()
        tier = parts[0] if len(parts) > 1 and parts[0] in TIERS else None
        marked = {m.name for m in item.iter_markers() if m.name in TIERS}
        if tier is None or marked - {tier}:
            misplaced.add(item.nodeid.split("::")[0])
            continue
        item.add_marker(tier)
    if misplaced:
        raise pytest.UsageError(
            "tests without a tier: move each file into tests/unit, tests/integration, tests/system or "
            "tests/real_model (README's Tests section says which), and give no test another tier's marker: "
            + ", ".join(sorted(misplaced))
        )


# ---- tiny models ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weight fp32 llama directory that mlx_lm.load accepts (built once per session)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A random-weight fp32 qwen2 directory: biased q/k/v projections, no make_cache method (built once)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", seed=0, model_type="qwen2")


@pytest.fixture(scope="session")
def model_builder() -> Callable[..., Path]:
    """`model_builder(out, hidden=..., layers=..., model_type=...)`: a random-weight model of another size."""
    return build_tiny_model


# ---- inputs and configurations --------------------------------------------------------------


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


@pytest.fixture(scope="session")
def eval_cli() -> Callable[..., int]:
    """`eval_cli(run, queries, *flags, **options) -> exit code`: `sami-mlx eval --run RUN --queries QUERIES`
    in this process, then `flags` as given and `options` as `cli_flags` writes them."""
    from sami_mlx.cli.main import main

    def run(run: Path | str, queries: Path | str, *flags: str, **options) -> int:
        return main(["eval", "--run", str(run), "--queries", str(queries), *flags, *cli_flags(**options)])

    return run


# ---- an offline Hugging Face cache ----------------------------------------------------------


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
    return {name: gz_jsonl(rows) for name, rows in HH_RLHF.items()}


@pytest.fixture
def hub_cache(offline_hub, hh_rlhf_files) -> Path:
    """An offline Hugging Face cache holding HH-RLHF files shaped like the real ones."""
    return offline_hub("Anthropic/hh-rlhf", hh_rlhf_files)


# ---- a past run, as the UI reads it ---------------------------------------------------------


@pytest.fixture(scope="session")
def past_run() -> Callable[..., Path]:
    """`past_run(root, name="demo", finished=True) -> Path`: a run directory with fixed numbers."""
    return write_past_run

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_tiny_model, build_tiny_qwen2  # noqa: E402

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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weight fp32 llama directory that mlx_lm.load accepts (built once per session)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A random-weight fp32 qwen2 directory (built once per session)."""
    return build_tiny_qwen2(tmp_path_factory.mktemp("models") / "tiny-qwen2", seed=0)


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


def make_tiny_run(root: Path, model: Path, iterations: int = 2) -> Path:
    """A finished SAMI run of the tiny model in root/run (constitution root/c.yaml, queries root/q.txt)."""
    from sami_mlx.config import TrainConfig
    from sami_mlx.loop.trainer import train

    (root / "c.yaml").write_text(CONSTITUTION)
    (root / "q.txt").write_text("\n".join(QUERIES[:4]) + "\n")
    train(
        TrainConfig(
            model=str(model),
            constitution=str(root / "c.yaml"),
            queries=str(root / "q.txt"),
            iterations=iterations,
            steps=1,
            queries_per_step=2,
            max_tokens=6,
            temperature=1.0,
            learning_rate=1e-2,
            max_ppl_ratio=None,
            variants="paper",
            out=str(root / "run"),
        )
    )
    return root

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_tiny_model  # noqa: E402

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

"""Queries: JSONL files with a `query` field, plain text files, or a built-in set by name."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from sami_mlx.errors import SamiError
from sami_mlx.fileio import json_lines, read_text

BUILTIN_QUERY_SETS = ("dialogue", "summarization")


def builtin_queries(name: str) -> list[str]:
    """One of the query sets shipped with the package ('dialogue' or 'summarization')."""
    if name not in BUILTIN_QUERY_SETS:
        raise SamiError(f"unknown built-in query set {name!r}; choose one of {', '.join(BUILTIN_QUERY_SETS)}")
    text = resources.files("sami_mlx.data.queries").joinpath(f"{name}.jsonl").read_text("utf-8")
    return _parse_jsonl(text, f"built-in:{name}")


def load_queries(source: str) -> list[str]:
    """Load queries from a built-in set name, a hub dataset (e.g. 'tldr:train[0:2000]'; see
    sami_mlx.inputs.datasets), a .jsonl file, or a text file (one query a line)."""
    if source in BUILTIN_QUERY_SETS and not Path(source).exists():
        return builtin_queries(source)
    from sami_mlx.inputs.datasets import is_dataset_spec, load_dataset_queries

    if is_dataset_spec(source) and not Path(source).exists():
        return load_dataset_queries(source)
    text = read_text(source, "queries file")
    if Path(source).suffix.lower() in (".jsonl", ".json"):
        queries = _parse_jsonl(text, source)
    else:
        queries = [line.strip() for line in text.splitlines() if line.strip()]
    if not queries:
        raise SamiError(f"{source}: no queries found; add one query per line")
    return queries


def _parse_jsonl(text: str, source: str) -> list[str]:
    queries = []
    for n, row in json_lines(text, source):
        if not isinstance(row, dict) or "query" not in row:
            raise SamiError(f'{source}: line {n} has no \'query\' field; write {{"query": "..."}}')
        if not isinstance(row["query"], str) or not row["query"].strip():
            raise SamiError(f"{source}: line {n} field 'query' must be a non-empty string")
        queries.append(row["query"].strip())
    return queries

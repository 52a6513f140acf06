"""Held-out text: reading the --heldout file, and its perplexity under a model (the loss never trains on it)."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from sami_mlx.errors import SamiError
from sami_mlx.fileio import json_lines, read_text
from sami_mlx.loop.logits import token_logprobs


def load_heldout(path: str) -> list[tuple[str, str]]:
    """Held-out (prompt, text) pairs: .jsonl rows with 'text' (or 'prompt' + 'completion'), else paragraphs."""
    text = read_text(path, "held-out text file")
    if not path.endswith(".jsonl"):
        return [("", p) for p in text.split("\n\n") if p.strip()]
    rows = []
    for n, row in json_lines(text, path):
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            rows.append(("", row["text"]))
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            rows.append((row["prompt"], row["completion"]))
        else:
            raise SamiError(f"{path}: line {n} needs a 'text' string field (or 'prompt' and 'completion')")
    return rows


def heldout_perplexity(
    model: nn.Module, tokenizer, texts: list[tuple[str, str]], max_len: int = 256, batch: int = 8
) -> float:
    """Perplexity of held-out text (after its prompt, if any) that the loss never trains on."""
    nll, count = heldout_nll(model, tokenizer, texts, max_len, batch)
    return math.exp(nll / max(count, 1))


def heldout_nll(
    model: nn.Module, tokenizer, texts: list[tuple[str, str]], max_len: int = 256, batch: int = 8
) -> tuple[float, int]:
    """Summed negative log-likelihood of the held-out texts' tokens, and how many tokens."""
    nll, count = 0.0, 0
    rows = []
    for prompt, text in texts:
        ids = tokenizer.encode(prompt + text)[:max_len]
        start = len(tokenizer.encode(prompt)) if prompt else 1
        if len(ids) > start:
            rows.append((ids, start))
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        L = max(len(ids) for ids, _ in chunk)
        arr = mx.array([ids + [0] * (L - len(ids)) for ids, _ in chunk])
        pos = mx.arange(1, L)[None, :]
        mask = (pos >= mx.array([s for _, s in chunk])[:, None]) & (
            pos < mx.array([len(ids) for ids, _ in chunk])[:, None]
        )
        nll -= float((token_logprobs(model, arr[:, :-1], arr[:, 1:]) * mask).sum())
        count += int(mask.sum())
    return nll, count

"""Drift: how far the model moved from what the base model writes, the degeneration monitor's measure.

SAMI's objective rewards any tell that separates the variants, gibberish included, and its loss
keeps falling while the model collapses. The monitor needs no data: at the start of a run the
base model answers a few held-out queries (never trained on) under each variant's prompt and
under the plain prompt with no constitution. Every check then measures the current model's
per-token NLL of those answers; exp(NLL now - NLL base) is the perplexity ratio ("drift"). A
healthy run moves it a little; a collapsing one (marker words, loops, replies that never end)
makes the base model's own answers hundreds of times less likely. Text the base never writes
(the raw queries, say) is no guide: a collapsing model can make it *more* likely.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from sami_mlx.fileio import atomic_write_json
from sami_mlx.loop.distributed import Ranks
from sami_mlx.loop.logits import token_logprobs
from sami_mlx.loop.rollout import Generation, generation_stats
from sami_mlx.loop.scoring import build_pairs

KINDS = ("prompted", "plain")


@dataclass
class Answer:
    """One base-model answer: the prompt's token ids and the answer's (with its EOS, if it had one)."""

    prompt: list[int]
    answer: list[int]


@dataclass
class Probe:
    """The held-out queries, the variants shown with them, and what the base model answered."""

    query_ids: list[int]
    variants: list[list[str]]  # per query, the labels of the N variants (e.g. "+-")
    prompted: list[Answer]  # K*N: query q, variant j at q*N + j
    plain: list[Answer]  # K: each query under the prompt with no constitution
    base_nll: dict[str, float]  # per-token NLL of the answers under the base model, per kind
    base_mi: float | None = None  # held-out MI bound of the base model's answers

    def save(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> Probe:
        data = json.loads(path.read_text(encoding="utf-8"))
        data["prompted"] = [Answer(**a) for a in data["prompted"]]
        data["plain"] = [Answer(**a) for a in data["plain"]]
        return cls(**data)


def answer_of(gen: Generation, eos: int) -> list[int]:
    """The ids the monitor scores: the response, and its EOS when it ended with one (where the base
    stops is behaviour too: a collapse often shows first as replies that never end)."""
    return gen.tokens + ([eos] if gen.finish == "eos" else [])


def mean_nll(model: nn.Module, answers: Sequence[Answer], batch: int = 16, ranks: Ranks | None = None) -> float:
    """Per-token negative log-likelihood of the answers after their prompts (prompt tokens excluded).
    With `ranks`, each rank scores every size-th answer (by length) and the sums are added up."""
    total, count = 0.0, 0.0
    # By length, so that a batch pads its rows to about the same length (the sum does not care).
    rows = sorted((a for a in answers if a.answer), key=lambda a: len(a.prompt) + len(a.answer))
    if ranks is not None:
        rows = rows[ranks.rank :: ranks.size]
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        pairs = build_pairs([[a.prompt] for a in chunk], [[a.answer] for a in chunk])
        logp = token_logprobs(model, pairs.inputs, pairs.targets)
        nll = -(logp * pairs.mask).sum()
        mx.eval(nll)
        total += float(nll)
        count += float(pairs.mask.sum())
    if ranks is not None:
        total, count = ranks.sum([total, count], "measuring drift")
    return total / max(count, 1.0)


def drift(model: nn.Module, probe: Probe, ranks: Ranks | None = None) -> dict[str, float]:
    """Perplexity of the base model's held-out answers under `model`, as a multiple of the base's;
    with `ranks`, the ranks split the answers (mean_nll)."""
    out = {}
    for kind in KINDS:
        answers = getattr(probe, kind)
        out[kind] = math.exp(mean_nll(model, answers, ranks=ranks) - probe.base_nll[kind]) if answers else 1.0
    return out


def answer_stats(gens: Sequence[Generation]) -> dict[str, float]:
    """What the model's own answers look like: mean length in tokens, the share that hit the token
    limit, distinct bigrams, and repetition (the share of a reply's trigrams that repeat an earlier one)."""
    st = generation_stats(gens)
    return {
        "mean_length": st.mean_length,
        "limit_rate": st.no_eos_rate,
        "distinct_2": st.distinct_2,
        "repetition": st.repetition,
    }

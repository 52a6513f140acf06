"""Rollouts: sample one response per (query, variant) with mlx-lm's BatchGenerator, keeping token ids."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.nn as nn
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler

from sami_mlx.inputs.constitution import Constitution
from sami_mlx.loop.faults import fault_point


@dataclass
class Generation:
    """One sampled response: its token ids (stop string and EOS cut off) and why it ended."""

    tokens: list[int]
    text: str
    finish: str  # "eos", "stop" (a stop string) or "length"


@dataclass
class Group:
    """One query with N variants and the response sampled under each variant's prompt."""

    query_index: int
    query: str
    variants: list  # list[Variant]
    generations: list[Generation]


@dataclass
class DropCounts:
    """Groups removed before training, by the first filter each failed (in this order)."""

    empty: int = 0
    identical: int = 0
    banned: int = 0
    echoed: int = 0  # --echo-words: a response copies a principle's wording
    truncated: int = 0  # --drop-truncated: a response ran into --max-tokens
    unfinished: int = 0  # --sentence-end: a checked response does not end a sentence

    @property
    def total(self) -> int:
        return self.empty + self.identical + self.banned + self.echoed + self.truncated + self.unfinished

    def as_event_fields(self) -> dict[str, int]:
        """The counts as SamplesReady's `dropped_<filter>` fields."""
        return {f"dropped_{name}": count for name, count in dataclasses.asdict(self).items()}


@dataclass
class SampleStats:
    """What the sampled responses look like: the degeneration watch reads these."""

    mean_length: float = 0.0
    no_eos_rate: float = 0.0
    distinct_2: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    repetition: float = 0.0  # mean share of a response's trigrams that repeat an earlier one


class StopRequested(Exception):
    """`should_stop` answered True while sampling: the responses finished so far were reported to
    `on_finished`; the others are lost."""


def generate_batch(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[list[int]],
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_strings: Sequence[str] = (),
    batch_size: int = 32,
    on_progress: Callable[[int, int], None] | None = None,
    on_finished: Callable[[int, Generation], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[Generation]:
    """Sample a response for every prompt in one BatchGenerator, cutting at EOS and stop strings.

    `on_finished(i, generation)` hears of each response (of `prompts[i]`) as soon as it ends;
    `should_stop` is polled between decode steps and raises StopRequested when it returns True.
    """
    sampler = make_sampler(temp=temperature, top_p=top_p)
    gen = BatchGenerator(
        model,
        max_tokens=max_tokens,
        stop_tokens=[[t] for t in tokenizer.eos_token_ids],
        sampler=sampler,
        completion_batch_size=batch_size,
        prefill_batch_size=min(batch_size, 8),
    )
    uids = gen.insert([list(p) for p in prompts])
    index = {u: i for i, u in enumerate(uids)}
    tokens: dict[int, list[int]] = {u: [] for u in uids}
    watch = {u: StopWatch(tokenizer, stop_strings) for u in uids} if stop_strings else {}
    done: dict[int, Generation] = {}

    def finish(uid: int, reason: str) -> None:
        toks = tokens[uid]
        if reason == "stop":
            toks = cut_at_stop(tokenizer, toks, stop_strings)
        done[uid] = Generation(toks, tokenizer.decode(toks), reason)
        if on_finished:
            on_finished(index[uid], done[uid])

    try:
        while responses := gen.next_generated():
            fault_point("sampling")
            cut = []
            for r in responses:
                if r.finish_reason == "stop":  # only EOS tokens are stop sequences here
                    finish(r.uid, "eos")
                    continue
                tokens[r.uid].append(r.token)
                if watch and watch[r.uid].add(r.token):
                    finish(r.uid, "stop")
                    if r.finish_reason is None:
                        cut.append(r.uid)
                elif r.finish_reason == "length":
                    finish(r.uid, "length")
            if cut:
                gen.remove(cut)
            if on_progress and (cut or any(r.finish_reason for r in responses)):
                on_progress(len(done), len(uids))
            if should_stop and len(done) < len(uids) and should_stop():
                raise StopRequested
    finally:
        gen.close()
    return [done[u] for u in uids]


class StopWatch:
    """Watches one response's text for stop strings as tokens arrive: mlx-lm's streaming detokenizer
    turns each token into its new characters (no re-decoding), and only the last few are searched."""

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self.detokenizer = tokenizer.detokenizer
        self.stops = list(stop_strings)
        self.keep = max(len(s) for s in self.stops) - 1
        self.tail = ""

    def add(self, token: int) -> bool:
        """Add a token; True once the text holds a stop string."""
        self.detokenizer.add_token(token)
        segment = self.detokenizer.last_segment
        if not segment:
            return False
        self.tail = self.tail[-self.keep :] + segment if self.keep else segment
        return any(s in self.tail for s in self.stops)


def cut_at_stop(tokenizer, tokens: list[int], stop_strings: Sequence[str]) -> list[int]:
    """The longest token prefix that ends before the first stop string, without trailing blanks."""
    text = tokenizer.decode(tokens)
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    if not hits:
        return tokens
    end = min(hits)
    # The decoded length grows with the prefix: bisect for the longest prefix within `end` characters.
    lo, hi = 0, len(tokens)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer.decode(tokens[:mid])) <= end:
            lo = mid
        else:
            hi = mid - 1
    k = lo
    while k > 0 and not tokenizer.decode(tokens[k - 1 : k]).strip():
        k -= 1
    return tokens[:k]


def filter_groups(
    groups: list[Group],
    banned: Sequence[str] = (),
    drop_truncated: bool = False,
    sentence_end: str = "off",
    sentence_end_marks: Sequence[str] = (".", "!", "?"),
    echo: tuple[Constitution, int] | None = None,
) -> tuple[list[Group], DropCounts]:
    """Drop groups a contrastive loss cannot (or should not) learn from, counting each under the first
    filter it fails: an empty response, two identical ones, a banned substring, a response that copies
    `echo`'s constitution (that many words in a row of a principle's wording), a response cut off at
    the token limit (`drop_truncated`), a response that does not end a sentence (`sentence_end`:
    'positive' checks the all-positive variant's response as the reference does, 'all' every one)."""
    marks = tuple(m for m in sentence_end_marks if m)
    kept, drops = [], DropCounts()
    for g in groups:
        texts = [gen.text.strip() for gen in g.generations]
        if any(not gen.tokens or not t for gen, t in zip(g.generations, texts)):
            drops.empty += 1
        elif len({tuple(gen.tokens) for gen in g.generations}) < len(g.generations):
            drops.identical += 1
        elif banned and any(b in t for t in texts for b in banned):
            drops.banned += 1
        elif echo and echo[1] and any(echo[0].echoes(t, echo[1]) for t in texts):
            drops.echoed += 1
        elif drop_truncated and any(gen.finish == "length" for gen in g.generations):
            drops.truncated += 1
        elif sentence_end != "off" and not all(t.endswith(marks) for t in _sentence_checked(g, texts, sentence_end)):
            drops.unfinished += 1
        else:
            kept.append(g)
    return kept, drops


def _sentence_checked(g: Group, texts: list[str], mode: str) -> list[str]:
    """The responses --sentence-end looks at: every one, or the all-positive variant's if the group has it."""
    if mode == "positive":
        positive = [t for v, t in zip(g.variants, texts) if getattr(v, "is_positive", False)]
        if positive:
            return positive
    return texts


def sample_stats(groups: list[Group], seconds: float) -> SampleStats:
    """Mean length, the share of responses that never reached EOS, distinct bigrams, repetition."""
    return generation_stats([g for group in groups for g in group.generations], seconds)


def generation_stats(gens: Sequence[Generation], seconds: float = 0.0) -> SampleStats:
    """The same numbers for any list of responses (the monitor's held-out answers too)."""
    if not gens:
        return SampleStats(seconds=seconds)
    lengths = [len(g.tokens) for g in gens]
    bigrams = [tuple(g.tokens[i : i + 2]) for g in gens for i in range(len(g.tokens) - 1)]
    return SampleStats(
        mean_length=sum(lengths) / len(gens),
        no_eos_rate=sum(g.finish == "length" for g in gens) / len(gens),
        distinct_2=len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
        tokens=sum(lengths),
        seconds=seconds,
        repetition=sum(repetition(g.tokens) for g in gens) / len(gens),
    )


def repetition(tokens: Sequence[int], n: int = 3) -> float:
    """Share of a sequence's n-grams that already occurred earlier in it (0 for no repeats)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0

"""SamiLoop's sampling: an iteration's query split, a response per (query, variant) shared across
ranks, degenerate groups dropped and replaced, and the groups written to (and read back from)
RUN/iter-NN/samples.jsonl."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from pathlib import Path

import mlx.core as mx

from sami_mlx import events as ev
from sami_mlx.config import TrainConfig
from sami_mlx.errors import RunAborted, SamiError
from sami_mlx.fileio import atomic_write_text, read_jsonl
from sami_mlx.inputs.constitution import Variant, principle_order, sample_variants
from sami_mlx.inputs.prompts import encode_prompt, encode_with_prefix
from sami_mlx.loop.distributed import Ranks
from sami_mlx.loop.prepare import RunInputs
from sami_mlx.loop.rollout import DropCounts, Generation, Group, filter_groups, generate_batch, sample_stats
from sami_mlx.loop.runstate import RunState


def derived_seed(*parts: int) -> int:
    """A 32-bit seed drawn from the run's seed and a position in its schedule."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


class Sampling:
    """SamiLoop's sampling (a mixin: SamiLoop sets the attributes below)."""

    cfg: TrainConfig
    inputs: RunInputs
    model: object
    tokenizer: object
    out: Path
    ranks: Ranks
    strategy: object
    emit: object

    def generation_ids(self, variant: Variant, query: str, order: list[int] | None = None) -> tuple[list, list]:
        """The generation prompt's ids and the --response-prefix ids that follow it."""
        text = self.inputs.generation_template.fill(self.inputs.constitution.render(variant, order), query)
        return encode_with_prefix(self.tokenizer, text, self.cfg.response_prefix, self.cfg.chat_template)

    def generation_prompt(self, variant: Variant, query: str) -> list[int]:
        """What the model answers under `variant` (the forced response prefix included), in file order."""
        ids, prefix = self.generation_ids(variant, query)
        return ids + prefix

    def plain_prompt(self, query: str) -> list[int]:
        """The prompt with no constitution: the anchor's template, else the training template left empty."""
        template = self.inputs.anchor_template or self.inputs.training_template
        return encode_prompt(self.tokenizer, template.fill("", query), self.cfg.chat_template)

    def query_split(self, it: int) -> tuple[int, list[int]]:
        """(split number, its query ids in order): the paper alternates two disjoint halves of the
        training queries; `continue` walks through all of them. Monitor queries are never in a split."""
        order = list(self.inputs.train_ids)
        if self.cfg.schedule == "paper" and len(order) >= 2:
            return it % 2, order[it % 2 :: 2]
        return 0, order

    def sample(self, it: int, count: int, state: RunState | None = None, split: list[int] | None = None) -> list[Group]:
        """`count` usable groups for iteration `it`: queries are taken in turn from the iteration's
        split (or the given `split` of query ids), and degenerate groups (dropped) are replaced by
        sampling more queries, as the reference does, until the split runs out; only then do groups
        repeat (and the run says so)."""
        cfg = self.cfg
        split_no, offset = 0, 0
        if split is None:
            split_no, split = self.query_split(it)
            offset = state.split_offsets[split_no] % len(split) if state else 0
        rng = random.Random(f"variants-{cfg.seed}-{it}")
        order_rng = random.Random(f"generation-order-{cfg.seed}-{it}")
        mx.random.seed(self.ranks.seed(cfg.seed * 1009 + it))
        groups: list[Group] = []
        kept: list[Group] = []
        drops = DropCounts()
        t0 = time.perf_counter()
        while len(kept) < count and len(groups) < len(split):
            need = count - len(kept)
            # The first wave asks for exactly what is needed; later ones for enough at the rate seen.
            rate = len(kept) / len(groups) if groups else 1.0
            wave = min(len(split) - len(groups), math.ceil(need / max(rate, 0.1)))
            ids = [split[(offset + len(groups) + n) % len(split)] for n in range(wave)]
            new, prefixes = self.sample_groups(it, ids, rng, order_rng, len(groups), count)
            new_kept, new_drops = filter_groups(
                new, cfg.banned, cfg.drop_truncated, cfg.sentence_end, cfg.sentence_end_marks
            )
            if cfg.response_prefix:  # filtered on what the model wrote; scored and judged with the forced start
                for slot, g in enumerate(new):
                    toks = [prefixes[slot, j] + x.tokens for j, x in enumerate(g.generations)]
                    g.generations = [
                        Generation(t, self.tokenizer.decode(t), x.finish) for t, x in zip(toks, g.generations)
                    ]
            groups += new
            kept += new_kept
            drops = _add_counts(drops, new_drops)
        seconds = time.perf_counter() - t0
        kept = kept[:count]  # the last wave may overshoot: the surplus stays in samples.jsonl, unused
        if state is not None:
            state.split_offsets[split_no] = (offset + len(groups)) % len(split)
        if self.ranks.primary:
            self.write_samples(it, groups, kept)
        stats = sample_stats(groups, seconds)
        repeated = max(count - len(kept), 0)
        self.emit(
            ev.SamplesReady(
                iteration=it + 1,
                groups=len(kept),
                dropped_empty=drops.empty,
                dropped_identical=drops.identical,
                dropped_banned=drops.banned,
                dropped_truncated=drops.truncated,
                dropped_unfinished=drops.unfinished,
                mean_length=stats.mean_length,
                no_eos_rate=stats.no_eos_rate,
                distinct_2=stats.distinct_2,
                tokens_per_sec=stats.tokens / max(seconds, 1e-9),
                examples=[_example(g) for g in kept[:3]],
                queries_sampled=len(groups),
                repeated=repeated,
                repetition=stats.repetition,
            )
        )
        if not kept:
            raise RunAborted(
                f"iteration {it + 1}: all {len(groups)} sampled groups were degenerate "
                f"({drops.empty} empty, {drops.identical} identical, {drops.banned} banned, "
                f"{drops.truncated} truncated, {drops.unfinished} without a sentence end); "
                "try --temperature 0.7, other --stop strings or another template"
            )
        if repeated:
            self.emit(
                ev.RunWarning(
                    f"iteration {it + 1}: the query split has {len(split)} queries and {len(kept)} usable groups for "
                    f"{count} step slots, so {repeated} slots repeat a group; give more queries or fewer --steps"
                )
            )
        return kept

    def sample_groups(
        self, it: int, query_ids: list[int], rng: random.Random, order_rng: random.Random, done: int, target: int
    ) -> tuple[list[Group], dict]:
        """A response per (query, variant), and the --response-prefix ids of each (slot, variant).
        Each rank samples its share of the queries and all ranks end with every group, so filtering
        and the step batches are the same everywhere."""
        cfg, inputs = self.cfg, self.inputs
        k = len(inputs.constitution.principles)
        specs = [(qi, sample_variants(self.strategy, k, rng)) for qi in query_ids]
        # File order, or (--shuffle-generation) one order per query group shared by its variants, drawn
        # for every slot in one process's order so that ranks and a resumed run draw the same.
        orders = [principle_order(k, order_rng, cfg.shuffle_generation) for _ in specs]
        mine = set(self.ranks.shard(len(specs)))
        prompts, prefixes = [], {}  # prefixes: every slot's, as every rank keeps every group
        for slot in range(len(specs)) if cfg.response_prefix else sorted(mine):
            qi, variants = specs[slot]
            for j, v in enumerate(variants):
                ids, prefixes[slot, j] = self.generation_ids(v, inputs.queries[qi], orders[slot])
                if slot in mine:
                    prompts.append(ids + prefixes[slot, j])
        n = inputs.num_variants
        gens = generate_batch(
            self.model,
            self.tokenizer,
            prompts,
            cfg.max_tokens,
            cfg.temperature,
            cfg.top_p,
            cfg.stop,
            cfg.gen_batch_size,
            # Progress over the iteration's slots; waves that replace dropped groups push the total up.
            on_progress=lambda d, t: self.emit(
                ev.SamplingProgress(
                    it + 1, (done * n + d * self.ranks.size), max(target * n, (done * n + t * self.ranks.size))
                )
            ),
        )
        gens = self.gather_generations(gens, len(specs))
        groups = [Group(qi, inputs.queries[qi], vs, gens[g * n : (g + 1) * n]) for g, (qi, vs) in enumerate(specs)]
        return groups, prefixes

    def gather_generations(self, gens: list[Generation], slots: int) -> list[Generation]:
        """Every rank's generations (its shard of `slots`, N each) in slot order, on every rank."""
        ranks = self.ranks
        if ranks.size == 1:
            return gens
        finish_codes = ("eos", "stop", "length")
        rows = [[finish_codes.index(g.finish), *g.tokens] for g in gens]
        per_rank = ranks.gather_lists(rows, "sharing the sampled responses")
        n, out = self.inputs.num_variants, []
        for slot in range(slots):
            rank, local = slot % ranks.size, slot // ranks.size
            for code, *tokens in per_rank[rank][local * n : (local + 1) * n]:
                out.append(Generation(tokens, self.tokenizer.decode(tokens), finish_codes[code]))
        return out

    def write_samples(self, it: int, groups: list[Group], kept: list[Group]) -> None:
        kept_ids = {id(g) for g in kept}
        lines = []
        for g in groups:
            lines.append(
                json.dumps(
                    {
                        **_example(g),
                        "query_index": g.query_index,
                        "tokens": [gen.tokens for gen in g.generations],
                        "finish": [gen.finish for gen in g.generations],
                        "kept": id(g) in kept_ids,
                    },
                    ensure_ascii=False,
                )
            )
        atomic_write_text(self.out / f"iter-{it + 1:02d}" / "samples.jsonl", "\n".join(lines) + "\n")

    def load_samples(self, it: int) -> list[Group]:
        """The kept groups of an iteration whose sampling finished before a stop."""
        path = self.out / f"iter-{it + 1:02d}" / "samples.jsonl"
        groups = []
        for row in read_jsonl(path):
            if row.get("kept"):
                variants = [Variant(tuple(c == "+" for c in label)) for label in row["variants"]]
                gens = [Generation(t, text, f) for t, text, f in zip(row["tokens"], row["responses"], row["finish"])]
                groups.append(Group(row["query_index"], row["query"], variants, gens))
        if not groups:
            raise SamiError(f"{path}: no sampled groups to resume from; the run directory is incomplete")
        return groups


def _example(g: Group) -> dict:
    return {
        "query": g.query,
        "variants": [v.label for v in g.variants],
        "responses": [gen.text for gen in g.generations],
    }


def variant_from_label(label: str) -> Variant:
    """The variant a label such as "+-" names."""
    return Variant(tuple(c == "+" for c in label))


def _add_counts(a: DropCounts, b: DropCounts) -> DropCounts:
    return type(a)(**{f.name: getattr(a, f.name) + getattr(b, f.name) for f in dataclasses.fields(a)})

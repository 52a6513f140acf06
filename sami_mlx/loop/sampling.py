"""The loop's sampling: an iteration's query split, a response per (query, variant) shared across
ranks, degenerate groups dropped and replaced, and the groups written to (and read back from)
RUN/iter-NN/samples.jsonl."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from sami_mlx import events as ev
from sami_mlx.config import TrainConfig
from sami_mlx.errors import RunAborted, SamiError
from sami_mlx.fileio import append_jsonl, atomic_write_text, read_jsonl
from sami_mlx.inputs.constitution import Variant, principle_order, sample_variants, variant_strategy
from sami_mlx.inputs.prompts import encode_prompt, encode_with_prefix
from sami_mlx.loop.distributed import Ranks
from sami_mlx.loop.prepare import RunInputs
from sami_mlx.loop.rollout import DropCounts, Generation, Group, filter_groups, generate_batch, sample_stats
from sami_mlx.loop.runstate import RunState


def queries_needed(groups: int, usable: float, splits: int, monitor: int) -> int:
    """Queries a file needs so that an iteration finds `groups` usable groups in its split, when a share
    `usable` of the sampled groups is kept: `splits` splits of that many (a tenth more, as the dropped
    share varies between iterations) beside the `monitor` queries held out."""
    return splits * math.ceil(1.1 * groups / max(usable, 0.1)) + monitor


def derived_seed(*parts: int) -> int:
    """A 32-bit seed drawn from the run's seed and a position in its schedule."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


class Sampler:
    """Prompts and responses for a run: the model answers each query under its variants' prompts,
    with the run's sampling settings. With several ranks each samples a share and all end with every
    group. Only rank 0 writes RUN/iter-NN/samples*.jsonl; events go to `emit`."""

    def __init__(
        self,
        cfg: TrainConfig,
        inputs: RunInputs,
        model: nn.Module,
        tokenizer: Any,
        out: Path,
        emit: Callable[[ev.Event], None],
        should_stop: Callable[[], bool],
        ranks: Ranks,
    ):
        self.cfg, self.inputs, self.model, self.tokenizer = cfg, inputs, model, tokenizer
        self.out, self.emit, self.should_stop, self.ranks = out, emit, should_stop, ranks
        self.strategy = variant_strategy(cfg.variants)

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

    def generate(self, prompts: list[list[int]], **hooks) -> list[Generation]:
        """Sample the prompts with the run's settings; `hooks`: generate_batch's on_progress and on_finished."""
        cfg = self.cfg
        return generate_batch(
            self.model,
            self.tokenizer,
            prompts,
            cfg.max_tokens,
            cfg.temperature,
            cfg.top_p,
            cfg.stop,
            cfg.gen_batch_size,
            **hooks,
            # A stop inside the sampling is not agreed across ranks: only a single process polls it.
            should_stop=self.should_stop if self.ranks.size == 1 else None,
        )

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
        repeat (and the run says so).

        With a `state` (the loop's own sampling), every group is appended to
        RUN/iter-NN/samples.partial.jsonl as it finishes, and groups found there are not sampled again.
        """
        cfg = self.cfg
        split_no, offset = 0, 0
        if split is None:
            split_no, split = self.query_split(it)
            offset = state.split_offsets[split_no] % len(split) if state else 0
        partial = self.partial_samples(it, count, split_no, offset, split) if state is not None else None
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
            new, prefixes = self.sample_groups(it, ids, rng, order_rng, len(groups), count, partial)
            new_kept, new_drops = filter_groups(
                new,
                cfg.banned,
                cfg.drop_truncated,
                cfg.sentence_end,
                cfg.sentence_end_marks,
                (self.inputs.constitution, cfg.echo_words),
            )
            if cfg.response_prefix:  # filtered on what the model wrote; scored and judged with the forced start
                for slot, g in enumerate(new):
                    g.generations = self.with_prefix(g.generations, prefixes, slot)
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
                **drops.as_event_fields(),
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
            why = (
                "every response was empty: the model ended (EOS or a --stop string) before writing anything; "
                "check the template's end, --response-prefix and --stop"
                if drops.empty == len(groups)
                else "try --temperature 0.7, other --stop strings or another template"
            )
            raise RunAborted(
                f"iteration {it + 1}: all {len(groups)} sampled groups were degenerate "
                f"({drops.empty} empty, {drops.identical} identical, {drops.banned} banned, "
                f"{drops.echoed} echoing the constitution, "
                f"{drops.truncated} truncated, {drops.unfinished} without a sentence end); {why}"
            )
        if repeated:
            splits = 2 if cfg.schedule == "paper" else 1
            enough = queries_needed(count, len(kept) / len(groups), splits, len(self.inputs.monitor_ids))
            self.emit(
                ev.RunWarning(
                    f"iteration {it + 1}: the query split has {len(split)} queries and {len(kept)} usable groups for "
                    f"{count} step slots, so {repeated} slots repeat a group; give about {enough} queries in "
                    f"{cfg.queries} (it has {len(self.inputs.queries)}), or lower --steps or --queries-per-step"
                )
            )
        return kept

    def partial_samples(self, it: int, count: int, split_no: int, offset: int, split: list[int]) -> PartialSamples:
        """The groups an earlier process sampled for this iteration (if it sampled with the same plan)."""
        split_hash = hashlib.sha256(repr(split).encode()).hexdigest()[:16]
        plan = {"iteration": it + 1, "seed": self.cfg.seed, "split": split_no, "offset": offset, "count": count}
        partial = PartialSamples(self.out / f"iter-{it + 1:02d}" / PARTIAL, {**plan, "queries": split_hash})
        partial.write = self.ranks.primary
        # Every rank has read the file before rank 0 starts a new one in its place.
        if self.ranks.size > 1:
            self.ranks.barrier("reading the partial samples")
        return partial

    def with_prefix(self, gens: list[Generation], prefixes: dict, slot: int) -> list[Generation]:
        """A group's responses with the forced --response-prefix put back in front."""
        toks = [prefixes[slot, j] + x.tokens for j, x in enumerate(gens)]
        return [Generation(t, self.tokenizer.decode(t), x.finish) for t, x in zip(toks, gens)]

    def sample_groups(
        self,
        it: int,
        query_ids: list[int],
        rng: random.Random,
        order_rng: random.Random,
        done: int,
        target: int,
        partial: PartialSamples | None = None,
    ) -> tuple[list[Group], dict]:
        """A response per (query, variant), and the --response-prefix ids of each (slot, variant).
        Each rank samples its share of the queries and all ranks end with every group, so filtering
        and the step batches are the same everywhere. Groups found in `partial` are not sampled again;
        the others are added to it, and reported (GroupSampled), each as soon as it is complete."""
        cfg, inputs = self.cfg, self.inputs
        k, n = len(inputs.constitution.principles), inputs.num_variants
        specs = [(qi, sample_variants(self.strategy, k, rng)) for qi in query_ids]
        # File order, or (--shuffle-generation) one order per query group shared by its variants, drawn
        # for every slot in one process's order so that ranks and a resumed run draw the same.
        orders = [principle_order(k, order_rng, cfg.shuffle_generation) for _ in specs]
        restored = {}
        for slot, (qi, variants) in enumerate(specs):
            found = partial.restored(done + slot, qi, [v.label for v in variants]) if partial else None
            if found is not None:
                restored[slot] = found
        todo = [slot for slot in range(len(specs)) if slot not in restored]
        mine = [todo[i] for i in self.ranks.shard(len(todo))]
        mine_set = set(mine)
        prompts, prefixes, owner = [], {}, []  # prefixes: every slot's, as every rank keeps every group
        for slot in range(len(specs)) if cfg.response_prefix else mine:
            qi, variants = specs[slot]
            for j, v in enumerate(variants):
                ids, prefixes[slot, j] = self.generation_ids(v, inputs.queries[qi], orders[slot])
                if slot in mine_set:
                    prompts.append(ids + prefixes[slot, j])
                    owner.append((slot, j))
        report = GroupReporter(self, it, specs, prefixes, done, target, partial)
        for slot, gens in restored.items():
            report.complete(slot, gens, resumed=True)
        pending: dict[int, dict[int, Generation]] = {}

        def finished(i: int, gen: Generation) -> None:
            slot, j = owner[i]
            got = pending.setdefault(slot, {})
            got[j] = gen
            if len(got) == n:
                report.complete(slot, [got[j] for j in range(n)])

        gens = self.generate(
            prompts,
            # Progress over the iteration's slots; waves that replace dropped groups push the total up.
            on_progress=lambda d, t: self.emit(
                ev.SamplingProgress(
                    it + 1,
                    (done + len(restored)) * n + d * self.ranks.size,
                    max(target * n, (done + len(restored)) * n + t * self.ranks.size),
                )
            ),
            on_finished=finished,
        )
        gens = self.gather_generations(gens, len(todo))
        for pos, slot in enumerate(todo):  # every rank's groups (and any not reported yet), in slot order
            report.complete(slot, gens[pos * n : (pos + 1) * n])
        groups = [Group(qi, inputs.queries[qi], vs, report.groups[g]) for g, (qi, vs) in enumerate(specs)]
        return groups, prefixes

    def gather_generations(self, gens: list[Generation], slots: int, per: int | None = None) -> list[Generation]:
        """Every rank's generations, in slot order, on every rank: each rank generated its shard of the
        `slots` slots (Ranks.shard), `per` generations a slot (N, a group's, unless told)."""
        ranks = self.ranks
        if ranks.size == 1:
            return gens
        per = self.inputs.num_variants if per is None else per
        finish_codes = ("eos", "stop", "length")
        rows = [[finish_codes.index(g.finish), *g.tokens] for g in gens]
        per_rank = ranks.gather_lists(rows, "sharing the sampled responses")
        out = []
        for pos in range(slots):
            rank, local = pos % ranks.size, pos // ranks.size
            for code, *tokens in per_rank[rank][local * per : (local + 1) * per]:
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
                variants = [variant_from_label(label) for label in row["variants"]]
                gens = [Generation(t, text, f) for t, text, f in zip(row["tokens"], row["responses"], row["finish"])]
                groups.append(Group(row["query_index"], row["query"], variants, gens))
        if not groups:
            raise SamiError(f"{path}: no sampled groups to resume from; the run directory is incomplete")
        return groups


PARTIAL = "samples.partial.jsonl"


class PartialSamples:
    """RUN/iter-NN/samples.partial.jsonl: an iteration's groups appended (and synced) as each one
    finishes, so that a stopped or killed run resumes its sampling where it was. The first line is
    the sampling plan (iteration, seed, query split and where in it the iteration starts); a file
    made under another plan is ignored and replaced. Each further line is one group under its slot
    (its place in the order the iteration samples queries) with the tokens the model wrote (before
    --response-prefix is put back)."""

    def __init__(self, path: Path, plan: dict):
        self.path, self.plan, self.write = path, plan, True
        rows = read_jsonl(path) if path.is_file() else []
        self.started = bool(rows) and rows[0].get("plan") == plan
        self.rows = {r["slot"]: r for r in rows[1:] if isinstance(r.get("slot"), int)} if self.started else {}

    def restored(self, slot: int, query_index: int, labels: list[str]) -> list[Generation] | None:
        """The responses saved for `slot`, if it holds that query under those variants."""
        row = self.rows.get(slot)
        if row is None or row.get("query_index") != query_index or row.get("variants") != labels:
            return None
        return [Generation(t, text, f) for t, text, f in zip(row["tokens"], row["responses"], row["finish"])]

    def add(self, slot: int, group: Group) -> None:
        if not self.write:
            return
        if not self.started:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"plan": self.plan}) + "\n")
            self.started = True
        gens = group.generations
        append_jsonl(
            self.path,
            {
                "slot": slot,
                **_example(group),
                "query_index": group.query_index,
                "tokens": [g.tokens for g in gens],
                "finish": [g.finish for g in gens],
            },
        )


class GroupReporter:
    """A wave's groups as they complete: each is saved to the partial samples file (unless it came
    from there) and reported as GroupSampled, once, when the last of its responses is in."""

    def __init__(self, loop: Sampler, it: int, specs: list, prefixes: dict, done: int, target: int, partial):
        self.loop, self.it, self.specs, self.prefixes = loop, it, specs, prefixes
        self.done, self.target, self.partial = done, target, partial
        self.groups: dict[int, list[Generation]] = {}

    def complete(self, slot: int, gens: list[Generation], resumed: bool = False) -> None:
        if slot in self.groups:
            return
        self.groups[slot] = gens
        loop = self.loop
        qi, variants = self.specs[slot]
        group = Group(qi, loop.inputs.queries[qi], variants, gens)
        if self.partial is not None and not resumed:
            self.partial.add(self.done + slot, group)
        shown = loop.with_prefix(gens, self.prefixes, slot) if loop.cfg.response_prefix else gens
        loop.emit(
            ev.GroupSampled(
                iteration=self.it + 1,
                query=group.query,
                variants=[v.label for v in variants],
                responses=[g.text for g in shown],
                finish=[g.finish for g in gens],
                done=self.done + len(self.groups),
                total=self.target,
                resumed=resumed,
            )
        )


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

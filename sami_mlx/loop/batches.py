"""The scoring batch of a set of groups: every variant's training prompt (each constitution in its own
principle order) and the response ids scored under them; the loop and the evaluation build it alike."""

from __future__ import annotations

import random
from collections.abc import Sequence

from sami_mlx.config import TrainConfig
from sami_mlx.inputs.constitution import Constitution, principle_order, variant_orders
from sami_mlx.inputs.prompts import Template, encode_prompt
from sami_mlx.loop.rollout import Generation, Group
from sami_mlx.loop.scoring import ScoringBatch


def response_ids(generations: Sequence[Generation], eos_token_id: int, count_eos: bool) -> list[list[int]]:
    """The token ids each response is scored on (with its EOS under --count-eos)."""
    return [gen.tokens + ([eos_token_id] if count_eos and gen.finish == "eos" else []) for gen in generations]


def training_orders(
    groups: Sequence[Group],
    cfg: TrainConfig,
    num_principles: int,
    rng: random.Random | None = None,
    orders: Sequence[Sequence[int]] | None = None,
) -> list[list[list[int]]]:
    """Per group, per variant, the principle order of its training prompt: the group's order is drawn from
    `rng` (or given in `orders`), and each other constitution of the group gets its own rearrangement of
    it, as the reference shuffles each separately."""
    out = []
    for n, g in enumerate(groups):
        if orders is not None:
            order = orders[n]
        elif rng is not None:
            order = principle_order(num_principles, rng, cfg.shuffle_principles)
        else:
            raise ValueError("training_orders needs an rng or the orders")
        out.append(variant_orders(order, len(g.variants), f"{cfg.seed}-{g.query_index}", cfg.shuffle_principles))
    return out


def scoring_batch(
    tokenizer,
    cfg: TrainConfig,
    constitution: Constitution,
    template: Template,
    groups: Sequence[Group],
    orders: Sequence[Sequence[Sequence[int]]],
    anchor_template: Template | None = None,
) -> ScoringBatch:
    """Group b's prompts under `template`, variant j with principle order `orders[b][j]`, and its
    response ids; with `anchor_template`, also each group's prompt with no constitution."""
    prompts = [
        [
            encode_prompt(tokenizer, template.fill(constitution.render(v, o), g.query), cfg.chat_template)
            for v, o in zip(g.variants, per_variant)
        ]
        for g, per_variant in zip(groups, orders)
    ]
    responses = [response_ids(g.generations, tokenizer.eos_token_id, cfg.count_eos) for g in groups]
    anchors = None
    if anchor_template is not None:
        anchors = [encode_prompt(tokenizer, anchor_template.fill("", g.query), cfg.chat_template) for g in groups]
    return ScoringBatch(prompts, responses, anchors)

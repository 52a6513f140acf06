"""Pretraining the toy world's tiny base model with MLX: tokenizer, weights, mlx-lm's directory format."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import cast

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from sami_mlx.cachedir import cache_dir
from sami_mlx.loop.distributed import Ranks
from sami_mlx.toy import world as toyworld
from sami_mlx.toy.markerworld import MarkerWorld

SPECIALS = ["<pad>", "<s>", "</s>"]
BUILD = 3  # bump when the training changes: cached toy models are keyed on it


def world_of(recipe: dict):
    """The synthetic world a recipe's corpus comes from: the toy world (a module), or a marker world
    drawn by its seed (`kind: marker-world`); both offer the same functions."""
    if recipe.get("kind") == "marker-world":
        return MarkerWorld(recipe.get("world_seed", 0), recipe.get("principles", 4))
    return toyworld


def recipe_key(recipe: dict) -> str:
    """Cache key: the recipe and the version of the world that generates its corpus."""
    keyed = {"recipe": recipe, "world": world_of(recipe).VERSION, "build": BUILD}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]


def toy_model_dir(recipe: dict) -> Path:
    return cache_dir() / "models" / f"{world_of(recipe).NAME}-{recipe_key(recipe)}"


def recipe_source(preset: dict, build: bool = True, log: Callable[[str], None] | None = None) -> Path | None:
    """The `local-recipe` model source (registered in pyproject.toml's sami_mlx.model_sources entry
    points): the model of a preset's `recipe`, built first when `build` (else None if not built yet)."""
    out = toy_model_dir(preset["recipe"])
    if (out / "model.safetensors").exists():
        return out
    if not build:
        return None
    if log:
        log(f"building the {preset.get('name', 'toy')} model from its recipe (a few minutes, once)")
    return ensure_toy_model(preset["recipe"])


def ensure_toy_model(
    recipe: dict, on_progress: Callable[[int, int, float], None] | None = None, ranks: Ranks | None = None
) -> Path:
    """The cached toy model for `recipe`, built first if missing (atomically: a kill leaves no half model).

    With several `ranks` they build it together when any of them lacks it (each computes part of every
    batch), and each writes it to its own cache (on one machine the first to finish keeps its copy)."""
    ranks = ranks or Ranks()
    out = toy_model_dir(recipe)
    if not ranks.any(not (out / "model.safetensors").exists(), "checking the toy model cache"):
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_toy_model(recipe, tmp, on_progress, ranks)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def train_tokenizer(texts: list[str], vocab_size: int, out: Path, specials: list[str] = SPECIALS, **config):
    """A byte-level BPE over the corpus, written as tokenizer.json + tokenizer_config.json (with the
    entries of `config` added, e.g. a chat_template). `specials` start with <pad>, <s> and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "model_max_length": 256,
                **config,
            },
            indent=2,
        )
    )
    return tok


# Every batch's gradient is the sum of this many shares' gradients, computed by as many ranks or one
# after another: float addition is commutative, so one process and two ranks build the same bytes.
SHARES = 2
GROUP = 8  # batches drawn together and sorted by length, so that a batch pads little


def batch_plan(docs: list[tuple[int, list[int]]], size: int, count: int, rng: random.Random) -> list[list[int]]:
    """`count` batches of `size` document indices, drawn by shuffled epochs: GROUP batches' worth at a
    time, sorted by length and cut into batches (in shuffled order), so that rows of a batch have
    about the same length and little compute goes to padding."""
    order: list[int] = []
    plan: list[list[int]] = []
    while len(plan) < count:
        if len(order) < size * GROUP:
            order = list(range(len(docs)))
            rng.shuffle(order)
        drawn, order = sorted(order[: size * GROUP], key=lambda i: len(docs[i][1])), order[size * GROUP :]
        batches = [drawn[k : k + size] for k in range(0, len(drawn), size)]
        rng.shuffle(batches)
        plan += batches
    return plan[:count]


def batch_arrays(rows: list[tuple[int, list[int]]]) -> tuple[mx.array, mx.array, mx.array]:
    """(ids [B, L], positions [B, R], mask [B, R]): the padded rows, and for each row the positions
    whose next token is a reply token (the reply and its EOS), as many as the longest reply has."""
    L = max(len(ids) for _, ids in rows)
    R = max(len(ids) - start for start, ids in rows)
    padded = mx.array([ids + [0] * (L - len(ids)) for _, ids in rows])
    # Position t predicts token t + 1: a reply starting at `start` is predicted from start - 1 on.
    positions = mx.array([[min(start - 1 + k, L - 2) for k in range(R)] for start, _ in rows])
    mask = mx.array([[float(k < len(ids) - start) for k in range(R)] for start, ids in rows])
    return padded, positions, mask


def reply_loss(
    model: nn.Module, ids: mx.array, positions: mx.array, mask: mx.array, count: int | None = None
) -> mx.array:
    """Mean cross-entropy of the reply tokens: the constitution and query
    are given, not predicted, so the model spends its capacity on how replies depend on them (the
    latent link SAMI amplifies). Only the reply positions go through the output layer. `count`: the
    number of reply tokens to divide by (these rows' own by default; a whole batch's when they are one
    rank's share of it)."""
    hidden = mx.take_along_axis(model.model(ids[:, :-1]), positions[..., None], axis=1)
    logits = model.model.embed_tokens.as_linear(hidden)  # the toy model ties its embeddings
    targets = mx.take_along_axis(ids[:, 1:], positions, axis=1)
    return (nn.losses.cross_entropy(logits, targets) * mask).sum() / (mask.sum() if count is None else count)


def build_toy_model(
    recipe: dict, out: Path, on_progress: Callable[[int, int, float], None] | None = None, ranks: Ranks | None = None
) -> Path:
    """Generate the corpus, train tokenizer and model, and write an mlx_lm.load-able directory.

    Every batch's gradient is the sum of SHARES shares' gradients. With several `ranks` (data parallel)
    each computes its shares and the ranks' sums are summed: with one or two ranks, bit for bit the
    update one process computes (with more, up to floating-point rounding)."""
    from mlx_lm.models import llama

    ranks = ranks or Ranks()
    out.mkdir(parents=True, exist_ok=True)
    seed = recipe["seed"]
    world = world_of(recipe)
    # A curriculum: the corpus opens with replies that follow their constitution strongly, so
    # the tiny model finds the link within its budget; the rest, which the base model ends up
    # reflecting, follows it only weakly.
    phases = [
        (recipe["curriculum"]["steps"], world.WorldSpec(**recipe["curriculum"]["world"])),
        (recipe["steps"] - recipe["curriculum"]["steps"], world.WorldSpec(**recipe.get("world", {}))),
    ]
    per_step = recipe["documents"] / recipe["steps"]
    bs = recipe["batch_size"]
    rng = random.Random(f"batches-{seed}")
    pairs = [world.corpus(max(1, round(n * per_step)), f"{seed}-{k}", spec) for k, (n, spec) in enumerate(phases)]
    tok = train_tokenizer([p + r for part in pairs for p, r in part], recipe["vocab_size"], out)
    eos = tok.token_to_id("</s>")
    # (reply start, ids): the loss covers the reply only (reply_loss).
    data = [
        [
            (len(prompt.ids), full.ids + [eos])
            for prompt, full in zip(tok.encode_batch([p for p, _ in part]), tok.encode_batch([p + r for p, r in part]))
        ]
        for part in pairs
    ]
    config = {
        "model_type": "llama",
        "hidden_size": recipe["hidden_size"],
        "num_hidden_layers": recipe["layers"],
        "intermediate_size": recipe["intermediate_size"],
        "num_attention_heads": recipe["heads"],
        "num_key_value_heads": recipe["heads"],
        "rms_norm_eps": 1e-5,
        "vocab_size": tok.get_vocab_size(),
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 256,
        "bos_token_id": tok.token_to_id("<s>"),
        "eos_token_id": eos,
    }
    plan = [(k, idx) for k, ((n, _), docs) in enumerate(zip(phases, data)) for idx in batch_plan(docs, bs, n, rng)]
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    lr, warmup = recipe["learning_rate"], recipe["warmup"]
    schedule = optim.join_schedules(
        [optim.linear_schedule(0.0, lr, warmup), optim.cosine_decay(lr, len(plan) - warmup, lr * 0.05)], [warmup]
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    loss_and_grad = nn.value_and_grad(model, reply_loss)
    shares = max(SHARES, ranks.size)
    for n, (k, idx) in enumerate(plan, 1):
        rows = [data[k][i] for i in idx]
        # Each share's rows, over the whole batch's reply tokens: the shares' sums make the batch's mean.
        count = sum(len(ids) - start for start, ids in rows)
        loss, grads = mx.array(0.0), tree_map(mx.zeros_like, model.trainable_parameters())
        for s in range(ranks.rank, shares, ranks.size):
            if share := rows[s::shares]:  # else more shares than rows
                share_loss, share_grads = loss_and_grad(model, *batch_arrays(share), count)
                loss, grads = loss + share_loss, tree_map(mx.add, grads, share_grads)
        grads = ranks.sum_gradients(grads, f"building the toy model (step {n})")
        optimizer.update(model, grads)
        mx.eval(loss, model.parameters(), optimizer.state)
        if n % 20 == 0 or n == len(plan):
            shown = ranks.sum([cast(float, loss.item())], "summing the toy model's loss")[0]
            if on_progress:
                on_progress(n, len(plan), shown)
    if not math.isfinite(shown):
        raise RuntimeError("toy model pretraining diverged; lower the recipe's learning_rate")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2))
    return out

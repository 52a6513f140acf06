"""Pretraining the toy world's tiny base model with MLX: tokenizer, weights, mlx-lm's directory format."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm.tuner.trainer import default_loss

from sami_mlx.toy import world as toyworld
from sami_mlx.toy.markerworld import MarkerWorld

SPECIALS = ["<pad>", "<s>", "</s>"]


def cache_dir() -> Path:
    """Where built models live: $SAMI_MLX_CACHE, else ~/.cache/sami-mlx."""
    root = os.environ.get("SAMI_MLX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sami-mlx"
    )
    return Path(root)


def world_of(recipe: dict):
    """The synthetic world a recipe's corpus comes from: the toy world (a module), or a marker world
    drawn by its seed (`kind: marker-world`); both offer the same functions."""
    if recipe.get("kind") == "marker-world":
        return MarkerWorld(recipe.get("world_seed", 0), recipe.get("principles", 4))
    return toyworld


def recipe_key(recipe: dict) -> str:
    """Cache key: the recipe and the version of the world that generates its corpus."""
    keyed = {"recipe": recipe, "world": world_of(recipe).VERSION}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]


def toy_model_dir(recipe: dict) -> Path:
    return cache_dir() / "models" / f"{world_of(recipe).NAME}-{recipe_key(recipe)}"


def ensure_toy_model(recipe: dict, on_progress: Callable[[int, int, float], None] | None = None) -> Path:
    """The cached toy model for `recipe`, built first if missing (atomically: a kill leaves no half model)."""
    out = toy_model_dir(recipe)
    if (out / "model.safetensors").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_toy_model(recipe, tmp, on_progress)
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


def _batches(docs: list[tuple[int, list[int]]], size: int, count: int, rng: random.Random):
    """`count` padded batches drawn by shuffled epochs, with (reply start, last target) per row."""
    order: list[int] = []
    for _ in range(count):
        if len(order) < size:
            order = list(range(len(docs)))
            rng.shuffle(order)
        idx, order = order[:size], order[size:]
        rows = [docs[i] for i in idx]
        L = max(len(ids) for _, ids in rows)
        yield (
            mx.array([ids + [0] * (L - len(ids)) for _, ids in rows]),
            mx.array([[start, len(ids) - 1] for start, ids in rows]),
        )


def build_toy_model(recipe: dict, out: Path, on_progress: Callable[[int, int, float], None] | None = None) -> Path:
    """Generate the corpus, train tokenizer and model, and write an mlx_lm.load-able directory."""
    from mlx_lm.models import llama

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
    pairs = [world.corpus(max(1, round(n * per_step)), f"{seed}-{k}", spec) for k, (n, spec) in enumerate(phases)]
    tok = train_tokenizer([p + r for part in pairs for p, r in part], recipe["vocab_size"], out)
    eos = tok.token_to_id("</s>")
    # The loss covers replies only: the constitution and query are given, not predicted, so the
    # model spends its capacity on how replies depend on them (the latent link SAMI amplifies).
    data = [[(len(tok.encode(p).ids), tok.encode(p + r).ids + [eos]) for p, r in part] for part in pairs]
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
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    steps, bs = recipe["steps"], recipe["batch_size"]
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(0.0, recipe["learning_rate"], recipe["warmup"]),
            optim.cosine_decay(recipe["learning_rate"], steps - recipe["warmup"], recipe["learning_rate"] * 0.05),
        ],
        [recipe["warmup"]],
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    loss_and_grad = nn.value_and_grad(model, default_loss)

    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths):
        (loss, _), grads = loss_and_grad(model, batch, lengths)
        optimizer.update(model, grads)
        return loss

    rng = random.Random(f"batches-{seed}")
    n = 0
    for (phase_steps, _), docs in zip(phases, data):
        for batch, lengths in _batches(docs, bs, phase_steps, rng):
            loss = step(batch, lengths)
            mx.eval(loss, state)
            n += 1
            if on_progress and (n % 20 == 0 or n == steps):
                on_progress(n, steps, loss.item())
    if not math.isfinite(loss.item()):
        raise RuntimeError("toy model pretraining diverged; lower the recipe's learning_rate")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2))
    return out

"""Tiny llama- and qwen2-style model directories that mlx_lm.load accepts, built offline in fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

CORPUS = [
    "The assistant gives a direct, useful answer that addresses what the person asked.",
    "The assistant refuses to help with anything that could hurt someone.",
    "Human: How do I bake bread at home? Assistant: Mix flour, water, yeast and salt.",
    "Human: What is the capital of France? Assistant: Paris is the capital of France.",
    "The summary is short and leaves out minor details. TL;DR: keep it brief.",
    "System: The assistant's replies follow its constitution, a numbered list of principles.",
    "1. Be kind. 2. Be brief. 3. Use numbers like 1, 2, 3, 42 and 100.",
    "Assistant constitution: follow the rules. Human: hello there! Assistant: hi, how can I help?",
    "Once upon a time there was a small model that learned to follow its principles.",
    "### Instruction: summarize the post. ### Response: the post asks for advice about a roommate.",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(out: Path, vocab_size: int = 384) -> dict:
    """Train a byte-level BPE on a fixed corpus and write tokenizer files; returns special ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "chat_template": CHAT_TEMPLATE,
                "model_max_length": 512,
            }
        )
    )
    return {"bos": bos, "eos": eos, "vocab_size": tok.get_vocab_size()}


def build_tiny_model(
    out: Path,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 512,
    model_type: str = "llama",
) -> Path:
    """Write a random-weight fp32 model directory (llama or qwen2) to `out` and return it."""
    from importlib import import_module

    arch = import_module(f"mlx_lm.models.{model_type}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = build_tokenizer(out)
    config = {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": ids["vocab_size"],
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": max_positions,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    mx.random.seed(seed)
    model = arch.Model(arch.ModelArgs.from_dict(config))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return out


def build_tiny_qwen2(out: Path, seed: int = 0, **kw) -> Path:
    """A random-weight fp32 qwen2 directory (biased q/k/v projections, no make_cache method)."""
    return build_tiny_model(out, seed=seed, model_type="qwen2", **kw)

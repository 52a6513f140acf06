"""Writing GGUF files the way llama.cpp's convert_hf_to_gguf.py does, from the tiny models the tests
build: its tensor names, its q/k row permutation for llama, its vocabulary (token list, token types,
merges and special ids through gguf-py's own SpecialVocab), quantized with gguf-py's quantizers."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as Q
from helpers import CORPUS

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = "<tool_call>"  # an added token that is not special (llama.cpp's USER_DEFINED type)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEXTS = CORPUS + ["café naïve 日本語 🙂 über straße", "tabs\tand  double  spaces   here", "2024 1999 42 3.14"] * 5


def bpe_tokenizer(style: str) -> Callable[[Path], dict]:
    """A byte-level BPE trained on the corpus, with SmolLM2's pre-tokenizer (digits one by one, then
    GPT-2's split: style 'smollm') or Qwen2's (its regex split: style 'qwen2'); ChatML special tokens."""

    def build(out: Path) -> dict:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

        tok = Tokenizer(models.BPE())
        if style == "smollm":
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
            )
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=BPE_SPECIALS,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(TEXTS, trainer)
        tok.add_tokens([AddedToken(USER_DEFINED, special=False, normalized=False)])
        tok.save(str(out / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "add_bos_token": False,
            "chat_template": CHATML,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config))
        ids = {t: tok.token_to_id(t) for t in BPE_SPECIALS}
        return {"bos": ids["<|im_start|>"], "eos": ids["<|im_end|>"], "vocab_size": tok.get_vocab_size()}

    return build


def spm_tokenizer(out: Path) -> dict:
    """A SentencePiece BPE with Llama's settings (byte fallback, digits split, spaces kept as they are),
    saved as tokenizer.model; the model's vocabulary is its size."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS),
        model_writer=model,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return {"bos": sp.bos_id(), "eos": sp.eos_id(), "vocab_size": sp.vocab_size()}


# ---- the writer ------------------------------------------------------------------------------

LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(name: str) -> str:
    module, kind = name.rsplit(".", 1)
    if module in TOP:
        return f"{TOP[module]}.{kind}"
    _, _, block, rest = module.split(".", 3)
    return f"blk.{block}.{LAYER[rest]}.{kind}"


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as written there (numpy for torch)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Where each K-quant block keeps its fp16 super-block scales (byte offsets): set to small values so that
# random bytes elsewhere make a valid block.
K_SCALES = {Q.Q4_K: ((0, 0.002), (2, 0.001)), Q.Q6_K: ((208, 0.002),)}


def random_kquant(shape: tuple[int, ...], qtype: Q, seed: int = 0) -> np.ndarray:
    """Random blocks of a K-quant type (gguf-py cannot quantize to these): a tensor of that type for
    the reader to widen; its values are whatever gguf.quants.dequantize says they are."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    data = np.random.default_rng(seed).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset, value in K_SCALES[qtype]:
        data[..., offset : offset + 2] = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)
    return data.reshape(rows, cols // block * size)


def encode(array: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype in K_SCALES:
        return random_kquant(array.shape, qtype)
    if qtype == Q.F32:
        return array.astype(np.float32)
    if qtype == Q.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array.astype(np.float32), qtype)


def write_gguf(
    model_dir: Path,
    path: Path,
    qtype: Q = Q.F32,
    *,
    pre: str = "smollm",
    arch: str | None = None,
    tensor_type: Callable[[str], Q] | None = None,
) -> Path:
    """Write the model at `model_dir` (a test model and its tokenizer) as a GGUF file at `path`, with its
    2-D tensors as `qtype` (or `tensor_type(gguf_name)`); norms stay F32 as llama.cpp keeps them."""
    config = json.loads((model_dir / "config.json").read_text())
    arch = arch or config["model_type"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_rope_dimension_count(config["hidden_size"] // heads)
    w.add_vocab_size(config["vocab_size"])
    if (model_dir / "tokenizer.model").exists():
        write_spm_vocab(w, model_dir)
    else:
        write_bpe_vocab(w, model_dir, pre)
    for name, value in mx.load(str(model_dir / "model.safetensors")).items():
        array = np.array(value.astype(mx.float32))
        if arch == "llama" and ".q_proj." in name:
            array = permute(array, heads, heads)
        if arch == "llama" and ".k_proj." in name:
            array = permute(array, heads, kv)
        target = gguf_name(name)
        t = (tensor_type(target) if tensor_type else qtype) if array.ndim == 2 else Q.F32
        w.add_tensor(target, encode(array, t), raw_dtype=t if t not in (Q.F32, Q.F16) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_bpe_vocab(w: gguf.GGUFWriter, model_dir: Path, pre: str) -> None:
    """convert_hf_to_gguf.py's _set_vocab_gpt2: tokens by id, added tokens as CONTROL (special) or
    USER_DEFINED, merges and special ids by gguf.SpecialVocab."""
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    reverse = {i: t for t, i in spec["model"]["vocab"].items()}
    added = {a["id"]: a for a in spec["added_tokens"]}
    n = max([*reverse, *added]) + 1
    tokens, types = [], []
    for i in range(n):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        elif i in reverse:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True).add_to_gguf(w, quiet=True)


def write_spm_vocab(w: gguf.GGUFWriter, model_dir: Path) -> None:
    """convert_hf_to_gguf.py's _set_vocab_sentencepiece: pieces, scores and types from tokenizer.model."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def source_ids_sp(model_dir: Path):
    """The SentencePiece processor of a model written with spm_tokenizer."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))

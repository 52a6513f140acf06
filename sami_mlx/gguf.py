"""Importing a GGUF file (llama.cpp's format, what Ollama and LM Studio keep on disk) as an mlx-lm model
directory: config.json, model.safetensors, tokenizer.json and tokenizer_config.json.

MLX reads the tensors (`mx.load`): Q4_0, Q4_1 and Q8_0 arrive as MLX's own affine quantization (weight,
scales, biases; groups of 32) and stay so; F32 and F16 stay as they are. The header is read here as
well, because `mx.load` neither says which type each tensor had nor checks a truncated file before
reading it, and it narrows BF16 to float16 (BF16 tensors are read from the file instead). Q4_K (the bulk
of a Q4_K_M file) is read from the file into the same 4-bit form, without loss: MLX 0.32 widens it to
float16 with its values out of order. The other K-quants MLX widens to float16 are quantized again, to 4
bits. Types MLX cannot read at all (Q5_0, Q5_K, the IQ types) are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from sami_mlx.cachedir import cache_dir
from sami_mlx.errors import SamiError
from sami_mlx.fileio import atomic_write_json

IMPORTER_VERSION = 1  # bump when the output changes: the cache is keyed on it
ARCHITECTURES = ("llama", "qwen2")
GROUP_SIZE = 32  # llama.cpp's blocks, and so MLX's groups for what it reads quantized
REQUANTIZE_BITS = 4
MAX_SHARD_GB = 5

# ggml tensor types: id -> (name, elements per block, bytes per block); bytes only for the ones read.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 0),
    17: ("IQ2_XS", 256, 0),
    18: ("IQ3_XXS", 256, 0),
    19: ("IQ1_S", 256, 0),
    20: ("IQ4_NL", 32, 0),
    21: ("IQ3_S", 256, 0),
    22: ("IQ2_S", 256, 0),
    23: ("IQ4_XS", 256, 0),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 0),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 0),
    35: ("TQ2_0", 256, 0),
    39: ("MXFP4", 32, 0),
}
KEEP = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q4_K"}
WIDENED = {"Q2_K", "Q6_K"}  # MLX dequantizes these to float16; they are quantized again
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

Log = Callable[[str], None]


# ---- the header ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it; `shape` in MLX's order (the header's reversed)."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int  # from the start of the file

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.type_id, (f"type {self.type_id}", 0, 0))[0]

    @property
    def nbytes(self) -> int:
        _, block, size = GGML_TYPES[self.type_id]
        return math.prod(self.shape) // block * size


@dataclass(frozen=True)
class GGUFHeader:
    """The metadata (key -> value; arrays of numbers as lists) and the tensor table of a GGUF file."""

    metadata: dict[str, Any]
    tensors: list[TensorInfo]


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Reader:
    def __init__(self, f: BinaryIO, path: Path, size: int):
        self.f, self.path, self.size = f, path, size

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) < n:
            raise SamiError(f"{self.path}: truncated GGUF file (its header ends early); download it again")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > self.size:
            raise SamiError(f"{self.path}: corrupt GGUF header (a string of {n} bytes); download it again")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise SamiError(f"{self.path}: corrupt GGUF header (a string is not UTF-8); download it again") from None

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.unpack("<I"), self.unpack("<Q")
            if n > self.size:
                raise SamiError(f"{self.path}: corrupt GGUF header (an array of {n} items); download it again")
            if item in _SCALARS:
                fmt = _SCALARS[item]
                width = struct.calcsize(fmt)
                return list(struct.unpack(f"<{n}{fmt[1]}", self.take(n * width)))
            return [self.value(item) for _ in range(n)]
        raise SamiError(f"{self.path}: corrupt GGUF header (value type {kind}); download it again")


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """The header of a GGUF file, checked against the file's size (so a truncated download is caught
    here, not halfway through loading); raises a one-line SamiError for anything that is not GGUF."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SamiError(f"{p}: GGUF file not found; check the path")
    size = p.stat().st_size
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SamiError(f"{p}: not a GGUF file (it does not start with 'GGUF'); pass a .gguf model file")
        r = _Reader(f, p, size)
        version = r.unpack("<I")
        if version not in (2, 3):
            raise SamiError(f"{p}: GGUF version {version} is not supported (2 and 3 are); convert it again")
        n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
        if n_tensors > size or n_kv > size:
            raise SamiError(f"{p}: corrupt GGUF header; download it again")
        metadata = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.unpack("<I"))
        raw = []
        for _ in range(n_tensors):
            name = r.string()
            dims = [r.unpack("<Q") for _ in range(r.unpack("<I"))]
            raw.append((name, tuple(reversed(dims)), r.unpack("<I"), r.unpack("<Q")))
        alignment = int(metadata.get("general.alignment", 32)) or 32
        start = -(-f.tell() // alignment) * alignment
    tensors = [TensorInfo(name, shape, t, start + off) for name, shape, t, off in raw]
    for t in tensors:
        if t.type_id in GGML_TYPES and GGML_TYPES[t.type_id][2] and t.offset + t.nbytes > size:
            raise SamiError(f"{p}: truncated GGUF file (tensor {t.name} ends past its {size} bytes); download it again")
    return GGUFHeader(metadata, tensors)


# ---- tensors ---------------------------------------------------------------------------------

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def mlx_name(path: Path, name: str) -> str | None:
    """mlx-lm's name for GGUF tensor `name` (None for one the import leaves out); a SamiError for one
    it does not know, such as a mixture of experts."""
    if name == "rope_freqs.weight":  # Llama 3's rotary factors: read into config.json instead
        return None
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias|scales|biases)", name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias|scales|biases)", name)
    if m and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    raise SamiError(f"{path}: tensor {name} is not one of a plain llama/qwen2 model's (mixture of experts?)")


def unpermute_rows(a, heads: int):
    """Undo llama.cpp's reordering of q/k rows for its interleaved rotary embedding (the reshape in
    convert_hf_to_gguf.py's LlamaModel.permute), back to the halves layout mlx-lm's llama uses.

    Rows of a quantized weight carry their own scales and biases, so the same reordering applies to
    the packed weight, the scales and the biases alike."""
    rows = a.shape[0]
    rest = tuple(a.shape[1:])
    return a.reshape(heads, rows // heads // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def _bf16(path: Path, t: TensorInfo):
    import mlx.core as mx
    import numpy as np

    raw = np.fromfile(path, dtype="<u2", count=math.prod(t.shape), offset=t.offset)
    return mx.array(raw.reshape(t.shape)).view(mx.bfloat16)


def _q4_k(path: Path, t: TensorInfo) -> dict:
    """A Q4_K tensor as MLX's 4-bit affine quantization, group 32, read from the file: no loss.

    Each block of 256 values holds fp16 `d` and `dmin`, twelve bytes of 6-bit (scale, min) pairs for
    its eight groups of 32, and 128 bytes of 4-bit values: per 64 values, 32 bytes whose low nibbles
    are the first group and high nibbles the second. Value = d·scale·q − dmin·min, which is MLX's
    scale·q + bias. (MLX 0.32's own float16 reading of Q4_K takes the nibbles in another order.)"""
    import mlx.core as mx
    import numpy as np

    rows, cols = math.prod(t.shape[:-1]), t.shape[-1]
    blocks = np.fromfile(path, dtype=np.uint8, count=t.nbytes, offset=t.offset).reshape(rows, cols // 256, 144)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    packed, qs = blocks[..., 4:16].astype(np.uint8), blocks[..., 16:]
    low, high = packed[..., 0:4], packed[..., 4:8]  # scales of groups 0-3, mins of groups 0-3
    rest = packed[..., 8:12]
    scale = np.concatenate([low & 63, (rest & 0xF) | ((low >> 6) << 4)], axis=-1).astype(np.float32)
    minimum = np.concatenate([high & 63, (rest >> 4) | ((high >> 6) << 4)], axis=-1).astype(np.float32)
    chunks = qs.reshape(rows, cols // 256, 4, 32)
    values = np.stack([chunks & 0xF, chunks >> 4], axis=3).reshape(rows, cols)  # groups in order
    pairs = values.reshape(rows, cols // 2, 2)
    weight = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8).reshape(rows, -1).view("<u4")
    return {
        "weight": mx.array(weight.reshape(*t.shape[:-1], cols // 8)),
        "scales": mx.array((d * scale).astype(np.float16).reshape(*t.shape[:-1], cols // GROUP_SIZE)),
        "biases": mx.array((-dmin * minimum).astype(np.float16).reshape(*t.shape[:-1], cols // GROUP_SIZE)),
    }


def convert_tensors(path: Path, header: GGUFHeader, log: Log) -> tuple[dict, dict, dict]:
    """(mlx-lm weights, quantized modules {module: bits}, other tensors by GGUF name) from the file."""
    import mlx.core as mx

    meta = header.metadata
    arch = meta["general.architecture"]
    heads = int(meta[f"{arch}.attention.head_count"])
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    loaded = cast("dict[str, Any]", mx.load(str(path), format="gguf"))  # without metadata: a dict of arrays
    weights: dict[str, Any] = {}
    bits: dict[str, int] = {}
    extras: dict[str, Any] = {}
    widened: Counter[str] = Counter()
    for info in header.tensors:
        name = info.name
        new = mlx_name(path, name)
        if new is None:
            extras[name] = loaded[name]
            continue
        module, kind = new.rsplit(".", 1)
        parts: dict[str, Any] = {kind: _bf16(path, info) if info.type_name == "BF16" else loaded[name]}
        base = name[: -len(".weight")]
        if kind == "weight" and f"{base}.scales" in loaded:  # kept quantized as MLX read it
            parts["scales"], parts["biases"] = loaded[f"{base}.scales"], loaded[f"{base}.biases"]
            bits[module] = parts["weight"].shape[-1] // parts["scales"].shape[-1]
        elif info.type_name == "Q4_K":
            parts = _q4_k(path, info)
            bits[module] = 4
        elif info.type_name in WIDENED and parts[kind].ndim == 2:
            q, s, b = mx.quantize(parts[kind], group_size=GROUP_SIZE, bits=REQUANTIZE_BITS)
            parts = {"weight": q, "scales": s, "biases": b}
            bits[module] = REQUANTIZE_BITS
            widened[info.type_name] += 1
        if arch == "llama" and re.search(r"\.attn_[qk]\.", name):
            n = heads if ".attn_q." in name else kv_heads
            parts = {k: unpermute_rows(v, n) for k, v in parts.items()}
        for suffix, value in parts.items():
            weights[f"{module}.{suffix}"] = value
    if widened:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(widened.items()))
        log(
            f"re-quantized {sum(widened.values())} tensors ({kinds}) to {REQUANTIZE_BITS} bits, group "
            f"{GROUP_SIZE}: MLX reads these types as float16"
        )
    return weights, bits, extras


# ---- config ----------------------------------------------------------------------------------


def _llama3_rope(path: Path, factors: list[float], theta: float, head_dim: int) -> dict:
    """mlx-lm's rope_scaling for Llama 3's rotary factors (GGUF keeps the factors, not the recipe):
    the published settings whose factors match, or a SamiError."""
    factor = max(factors)
    for low, high, original in ((1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 4.0, 131072)):
        expected = []
        for i in range(0, head_dim, 2):
            wavelen = 2 * math.pi * theta ** (i / head_dim)
            if wavelen < original / high:
                expected.append(1.0)
            elif wavelen > original / low:
                expected.append(factor)
            else:
                smooth = (original / wavelen - low) / (high - low)
                expected.append(1 / ((1 - smooth) / factor + smooth))
        if len(expected) == len(factors) and all(abs(a - b) < 1e-3 * b for a, b in zip(expected, factors)):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": original,
            }
    raise SamiError(f"{path}: rope_freqs.weight does not match Llama 3's rotary scaling; this import cannot read it")


TYPE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q8_0": 8, **dict.fromkeys(WIDENED, REQUANTIZE_BITS)}
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def header_config(path: Path) -> dict:
    """config.json as the import would write it, from the header alone (for a plan's memory estimate)."""
    header = read_header(path)
    check_gguf(path, header)
    bits = {}
    for t in header.tensors:
        if t.type_name in TYPE_BITS and len(t.shape) == 2 and t.name.endswith(".weight"):
            module = mlx_name(path, t.name)
            if module:
                bits[module.rsplit(".", 1)[0]] = TYPE_BITS[t.type_name]
    return model_config(path, header, bits)


def model_config(path: Path, header: GGUFHeader, bits: dict, extras: dict | None = None) -> dict:
    """config.json for mlx-lm, from the metadata and the tensor table; `bits` per quantized module."""
    import mlx.core as mx

    meta = header.metadata
    arch = meta["general.architecture"]

    def field(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise SamiError(f"{path}: metadata {arch}.{key} is missing; this is not a complete model file")
        return value

    hidden = int(field("embedding_length"))
    heads = int(field("attention.head_count"))
    tensors = {t.name: t for t in header.tensors}
    if "token_embd.weight" not in tensors:
        raise SamiError(f"{path}: no token_embd.weight tensor; this is not a complete model file")
    head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
    theta = float(field("rope.freq_base", 10000.0))
    floats = [FLOAT_DTYPES[t.type_name] for t in header.tensors if t.type_name in FLOAT_DTYPES and len(t.shape) == 2]
    dtype = floats[0] if floats else "float16"  # a quantized model's scales are float16
    config: dict[str, Any] = {
        "model_type": arch,
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(field("block_count")),
        "intermediate_size": int(field("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        # stored as float32: 1e-5 reads back as 9.999999747e-06
        "rms_norm_eps": float(f"{float(field('attention.layer_norm_rms_epsilon', 1e-6)):.7g}"),
        "rope_theta": theta,
        "vocab_size": int(tensors["token_embd.weight"].shape[0]),
        "max_position_embeddings": int(field("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": dtype,
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(field("rope.scaling.factor"))}
    if extras and "rope_freqs.weight" in extras:
        factors = extras["rope_freqs.weight"].astype(mx.float32).tolist()
        config["rope_scaling"] = _llama3_rope(path, factors, theta, head_dim)
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        if f"tokenizer.ggml.{name}_token_id" in meta:
            config[key] = int(meta[f"tokenizer.ggml.{name}_token_id"])
    if bits:
        common = Counter(bits.values()).most_common(1)[0][0]
        quant: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": common, "mode": "affine"}
        quant.update({m: {"group_size": GROUP_SIZE, "bits": b} for m, b in sorted(bits.items()) if b != common})
        config["quantization"] = quant
        config["quantization_config"] = quant
    return config


# ---- tokenizer -------------------------------------------------------------------------------

# The pre-tokenizers of the BPE vocabularies llama.cpp names in tokenizer.ggml.pre, as Hugging Face
# writes them in tokenizer.json.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
GPT2 = ("gpt-2", "gpt2", "default", "mpt", "olmo", "jais")


def _pre_tokenizer(pre: str, log: Log):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = {"qwen2": QWEN2_SPLIT, "stablelm2": QWEN2_SPLIT, "llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT}
    if pre in split:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split[pre]), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre not in GPT2:
        log(f"tokenizer.ggml.pre {pre!r} is not one this import knows; splitting text as GPT-2 does")
    return byte_level


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges for a SentencePiece vocabulary, the way Hugging Face converts one: every split of a
    piece into two pieces of the vocabulary, the merge ranked by the joined piece's score."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == TOKEN_NORMAL}
    merges = []
    for piece, i in vocab.items():
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges += [(left, right, scores[i]) for left, right in local]
    merges.sort(key=lambda m: -m[2])  # stable: ties keep the order above
    return [(left, right) for left, right, _ in merges]


def build_tokenizer(path: Path, meta: dict, log: Log):
    """A `tokenizers.Tokenizer` from the metadata: GPT-2-style byte-level BPE ("gpt2") or a
    SentencePiece vocabulary ("llama", as a BPE with byte fallback)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise SamiError(f"{path}: no tokenizer.ggml.tokens in the metadata; this file carries no tokenizer")
    types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    add_bos, add_eos = _add_bos_eos(meta)
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        tok.pre_tokenizer = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")), log)
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        unk = int(meta.get("tokenizer.ggml.unknown_token_id", 0))
        tok = Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=_spm_merges(tokens, scores, types),
                unk_token=tokens[unk],
                fuse_unk=True,
                byte_fallback=True,
            )
        )
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        replace = normalizers.Replace(" ", "▁")
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if prefix else replace
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if prefix else steps)
    else:
        raise SamiError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (gpt2 and llama are)")
    tok.add_tokens(
        [
            AddedToken(t, special=types[i] == TOKEN_CONTROL, normalized=False)
            for i, t in enumerate(tokens)
            if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
        ]
    )
    specials = [t for i, t in enumerate(tokens) if types[i] == TOKEN_CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    single, pair, used = "$A", "$A $B", []
    for wanted, key, where in ((add_bos, "bos", "start"), (add_eos, "eos", "end")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if wanted and token_id is not None:
            t = tokens[int(token_id)]
            single = f"{t} {single}" if where == "start" else f"{single} {t}"
            pair = f"{t} {pair}" if where == "start" else f"{pair} {t}"
            used.append((t, int(token_id)))
    if used:
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=used)
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _add_bos_eos(meta: dict) -> tuple[bool, bool]:
    # llama.cpp's defaults where the file says nothing: a BOS for SentencePiece vocabularies only.
    kind = meta.get("tokenizer.ggml.model")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    return bool(add_bos), bool(meta.get("tokenizer.ggml.add_eos_token", False))


def tokenizer_config(meta: dict, context: int) -> dict:
    """tokenizer_config.json: the special tokens by name, whether BOS/EOS are added, the chat template."""
    tokens = meta["tokenizer.ggml.tokens"]
    add_bos, add_eos = _add_bos_eos(meta)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context,
    }
    for key, name in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            config[f"{key}_token"] = tokens[int(token_id)]
    if isinstance(meta.get("tokenizer.chat_template"), str):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


# ---- the import ------------------------------------------------------------------------------


def check_gguf(path: Path, header: GGUFHeader) -> None:
    """Refuse, in one line, an architecture or a tensor type this import cannot convert."""
    arch = header.metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise SamiError(
            f"{path}: architecture {arch!r} is not supported; GGUF import reads {', '.join(ARCHITECTURES)} "
            "(Mistral and SmolLM files are llama)"
        )
    for t in header.tensors:
        if t.type_name not in KEEP | WIDENED:
            raise SamiError(
                f"{path}: tensor {t.name} has type {t.type_name}, which MLX cannot read; use a file quantized "
                "as Q4_0, Q4_1, Q8_0, Q4_K_M, F16 or BF16"
            )


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SamiError(f"{out}: already exists and is not empty; choose another --out or remove it")


def import_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, log: Log | None = None) -> Path:
    """Convert the GGUF file at `path` into an mlx-lm model directory `out_dir` and return it.

    The directory is built in a temporary sibling and renamed into place, so a failure leaves nothing
    half-written. `log` receives the lines worth telling a user (re-quantized tensors, guesses)."""
    import mlx.core as mx

    log = log or (lambda line: None)
    src, out = Path(path).expanduser(), Path(out_dir).expanduser()
    _check_out(out)
    header = read_header(src)
    check_gguf(src, header)
    weights, bits, extras = convert_tensors(src, header, log)
    config = model_config(src, header, bits, extras)
    tokenizer = build_tokenizer(src, header.metadata, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _save_weights(tmp, weights)
        # Plain writes inside the temporary folder: the rename below publishes them all at once.
        _write_json(tmp / "config.json", config)
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config(header.metadata, config["max_position_embeddings"]))
        _write_json(
            tmp / "gguf_source.json",
            {
                "file": src.name,
                "importer_version": IMPORTER_VERSION,
                "tensor_types": dict(Counter(t.type_name for t in header.tensors)),
                "name": header.metadata.get("general.name"),
            },
        )
        del weights
        mx.clear_cache()
        for f in tmp.iterdir():  # on disk before the rename makes them visible
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _save_weights(folder: Path, weights: dict) -> None:
    import mlx.core as mx

    total = sum(v.nbytes for v in weights.values())
    if total <= MAX_SHARD_GB * 2**30:
        mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
        return
    from mlx_lm.utils import make_shards

    shards = make_shards(weights, max_file_size_gb=MAX_SHARD_GB)
    index: dict[str, Any] = {"metadata": {"total_size": total}, "weight_map": {}}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
        index["weight_map"].update(dict.fromkeys(shard, name))
    _write_json(folder / "model.safetensors.index.json", index)


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished directory into place; an empty `out` is replaced, a full one is an error
    (unless another process just published the same import there)."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    try:
        os.replace(tmp, out)
    except OSError:
        if not (out / "config.json").is_file():
            raise SamiError(f"{out}: already exists and is not empty; choose another --out or remove it") from None


# ---- the cache -------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """The sha256 of a file, remembered by (path, size, mtime) so a multi-GB file is hashed once."""
    st = path.stat()
    memo_path = cache_dir() / "gguf" / "hashes.json"
    key = str(path.resolve())
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    seen = memo.get(key)
    if isinstance(seen, dict) and seen.get("size") == st.st_size and seen.get("mtime_ns") == st.st_mtime_ns:
        return str(seen["sha256"])
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    memo[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest.hexdigest()}
    try:
        atomic_write_json(memo_path, memo)
    except OSError:  # a read-only cache only costs a second hash
        pass
    return digest.hexdigest()


def gguf_model_dir(sha256: str) -> Path:
    """Where `cached_gguf_model` keeps the import of a file whose content has this sha256."""
    return cache_dir() / "models" / f"gguf-{sha256[:16]}-v{IMPORTER_VERSION}"


def gguf_cache_dir(path: str | os.PathLike) -> Path:
    """Where `cached_gguf_model` keeps the import of the file at `path` (keyed by its content)."""
    return gguf_model_dir(file_sha256(Path(path).expanduser()))


def cached_gguf_model(path: str | os.PathLike, log: Log | None = None) -> Path:
    """The mlx-lm directory of the GGUF file at `path`, imported into the cache the first time."""
    p = Path(path).expanduser()
    check_gguf(p, read_header(p))  # not GGUF, truncated, unsupported: one line before hashing gigabytes
    out = gguf_cache_dir(p)
    if (out / "config.json").is_file():
        return out
    if log:
        log(f"importing {p.name} into {out}")
    return import_gguf(p, out, log)

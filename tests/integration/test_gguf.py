"""GGUF import: tiny llama and qwen2 models written as llama.cpp writes them (tests/ggufs.py), imported
back, and compared with their source: logits, token ids, the quantization kept, and the one-line refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from ggufs import Q, bpe_tokenizer, encode, spm_tokenizer, write_gguf
from mlx.utils import tree_unflatten

import sami_mlx.gguf as G
from sami_mlx.cli.main import main
from sami_mlx.errors import SamiError
from sami_mlx.model import upcast_for_cpu

IDS = mx.array([[5, 17, 99, 3, 250, 42, 7, 8, 300, 11, 1, 2]])
TEXTS = [
    "The year 2024 had 366 days, and 3.14159 is pi.",
    "café naïve 日本語 🙂 über Ωmega ∑",
    "a  b   c    d\t\te\n\n\nf   ",
    "<|im_start|>user\nHi 42<|im_end|>\n<|im_start|>assistant\n",
    "<tool_call>call 12</tool_call><|endoftext|>",
]


@pytest.fixture(scope="module")
def sources(model_builder, tmp_path_factory) -> dict[str, Path]:
    """Source models: llama with SmolLM2's kind of BPE, qwen2 with Qwen2's, llama with SentencePiece."""
    root = tmp_path_factory.mktemp("gguf-sources")
    return {
        "llama": model_builder(root / "llama", tokenizer=bpe_tokenizer("smollm")),
        "qwen2": model_builder(root / "qwen2", model_type="qwen2", tokenizer=bpe_tokenizer("qwen2")),
        "spm": model_builder(root / "spm", tokenizer=spm_tokenizer),
    }


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SAMI_MLX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def load(path: Path):
    """mlx-lm's model, with its scales widened as sami-mlx does on the CPU (then quantized matmuls are
    exact in fp32), and tokenizer."""
    model, tokenizer = mlx_lm.load(str(path))[:2]
    upcast_for_cpu(model)
    return model, tokenizer


def dequantized_source(src: Path, qtype: Q):
    """The source model with each 2-D weight replaced by what the GGUF file holds for it."""
    model, _ = load(src)
    weights = {
        k: mx.array(gguf.quants.dequantize(encode(np.array(v), qtype), qtype).reshape(v.shape)) if v.ndim == 2 else v
        for k, v in mx.load(str(src / "model.safetensors")).items()
    }
    model.update(tree_unflatten(list(weights.items())))
    return model


def imported(src: Path, tmp_path: Path, qtype: Q = Q.F32, **kw) -> Path:
    return G.import_gguf(write_gguf(src, tmp_path / f"{src.name}-{qtype.name}.gguf", qtype, **kw), tmp_path / "out")


def max_diff(a: mx.array, b: mx.array) -> float:
    return float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max())


# ---- weights and logits ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_import_gives_the_source_models_logits(sources, tmp_path, arch):
    out = imported(sources[arch], tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch and "quantization" not in config
    assert max_diff(load(out)[0](IDS), load(sources[arch])[0](IDS)) < 1e-5


@pytest.mark.parametrize(
    "arch,qtype,bits",
    [
        ("llama", Q.Q8_0, 8),
        ("llama", Q.Q4_0, 4),
        ("llama", Q.Q4_1, 4),
        ("qwen2", Q.Q8_0, 8),
        ("qwen2", Q.Q4_0, 4),
        ("llama", Q.F16, None),
        ("llama", Q.BF16, None),
    ],
)
def test_quantized_and_16_bit_tensors_stay_as_the_file_has_them(sources, tmp_path, arch, qtype, bits):
    out = imported(sources[arch], tmp_path, qtype)
    config = json.loads((out / "config.json").read_text())
    stored = mx.load(str(out / "model.safetensors"))
    q_proj = stored["model.layers.0.self_attn.q_proj.weight"]
    if bits:  # packed by MLX as the file had it: no float copy anywhere
        assert config["quantization"] == {"group_size": 32, "bits": bits, "mode": "affine"}
        assert q_proj.dtype == mx.uint32 and q_proj.shape[-1] * 32 // bits == config["hidden_size"]
    else:
        assert "quantization" not in config
        assert q_proj.dtype == {Q.F16: mx.float16, Q.BF16: mx.bfloat16}[qtype]
        assert config["torch_dtype"] == {Q.F16: "float16", Q.BF16: "bfloat16"}[qtype]
    logits = load(out)[0](IDS)
    # exactly the values in the file (to fp32 rounding), and the source's within the quantization error
    assert max_diff(logits, dequantized_source(sources[arch], qtype)(IDS)) < 1e-4
    source = load(sources[arch])[0](IDS)
    bound = {Q.Q8_0: 0.1, Q.Q4_0: 1.5, Q.Q4_1: 1.5, Q.F16: 0.02, Q.BF16: 0.1}[qtype]
    assert 0 < max_diff(logits, source) < bound


def test_mixed_bits_are_recorded_per_layer(sources, tmp_path):
    # SmolLM2's Q4_1 file keeps its embedding as Q8_0: the config must say so for that layer only
    out = imported(sources["llama"], tmp_path, tensor_type=lambda n: Q.Q8_0 if n.startswith("token_embd") else Q.Q4_1)
    quant = json.loads((out / "config.json").read_text())["quantization"]
    assert quant["bits"] == 4 and quant["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    model = dequantized_source(sources["llama"], Q.Q4_1)
    source = mx.load(str(sources["llama"] / "model.safetensors"))["model.embed_tokens.weight"]
    model.model.embed_tokens.weight = mx.array(
        gguf.quants.dequantize(encode(np.array(source), Q.Q8_0), Q.Q8_0).reshape(source.shape)
    )
    assert max_diff(load(out)[0](IDS), model(IDS)) < 1e-4


def test_rotary_rows_are_put_back_in_mlx_lms_order(sources, tmp_path, monkeypatch):
    """llama.cpp reorders q/k rows for its interleaved rotary embedding. The import undoes it; without
    that the logits are wrong, and the file's own layout matches only with rope_traditional."""
    src = write_gguf(sources["llama"], tmp_path / "llama.gguf")
    source = load(sources["llama"])[0](IDS)
    monkeypatch.setattr(G, "unpermute_rows", lambda a, heads: a)
    as_stored = G.import_gguf(src, tmp_path / "as-stored")
    assert max_diff(load(as_stored)[0](IDS), source) > 0.1
    config = json.loads((as_stored / "config.json").read_text())
    (as_stored / "config.json").write_text(json.dumps({**config, "rope_traditional": True}))
    assert max_diff(load(as_stored)[0](IDS), source) < 1e-5


def test_k_quants_are_kept_or_quantized_again_to_4_bits(model_builder, tmp_path):
    """Q4_K (most of a Q4_K_M file) becomes MLX's 4-bit form as it is; Q6_K, which MLX widens to float16,
    is quantized again to 4 bits, within a 4-bit step of its values."""
    # K-quant blocks hold 256 values: a model 256 wide, its MLP in Q4_K (up) and Q6_K (down)
    src = model_builder(tmp_path / "wide", hidden=256, layers=1, tokenizer=bpe_tokenizer("smollm"))
    kinds = {"ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K}
    path = write_gguf(
        src, tmp_path / "k.gguf", tensor_type=lambda n: next((q for k, q in kinds.items() if k in n), Q.F32)
    )
    lines: list[str] = []
    out = G.import_gguf(path, tmp_path / "out", lines.append)
    assert lines == ["re-quantized 1 tensors (1 Q6_K) to 4 bits, group 32: MLX reads these types as float16"]
    quant = json.loads((out / "config.json").read_text())["quantization"]
    assert quant == {"group_size": 32, "bits": 4, "mode": "affine"}
    stored = mx.load(str(out / "model.safetensors"))
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for gguf_name, name in (("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
        t = tensors[f"blk.0.{gguf_name}.weight"]
        want = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(-1, 32)
        p = f"model.layers.0.mlp.{name}"
        got = mx.dequantize(stored[f"{p}.weight"], stored[f"{p}.scales"], stored[f"{p}.biases"], 32, 4)
        err = np.abs(np.array(got.astype(mx.float32)).reshape(-1, 32) - want).max(1)
        span = want.max(1) - want.min(1)
        if gguf_name == "ffn_up":  # the same values, to the fp16 rounding of each group's scale
            assert np.all(err <= 2e-3 * np.abs(want).max(1) + 1e-6)
        else:  # within a 4-bit step of each group's range (MLX moves the grid so that 0 is on it)
            assert np.all(err <= span / 15 + 1e-6)


# ---- the tokenizer ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bpe_tokenizer_gives_the_sources_ids(sources, tmp_path, arch):
    pre = "smollm" if arch == "llama" else "qwen2"
    out = imported(sources[arch], tmp_path, pre=pre)
    _, source = mlx_lm.load(str(sources[arch]))
    _, tok = load(out)
    for text in TEXTS:
        assert tok.encode(text) == source.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>")[0] == source.convert_tokens_to_ids("<|im_start|>")  # one special token
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert config["add_bos_token"] is False
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == source.apply_chat_template(
        messages, add_generation_prompt=True
    )
    assert tok.eos_token_id == source.convert_tokens_to_ids("<|im_end|>")


def test_sentencepiece_tokenizer_gives_sentencepieces_ids(sources, tmp_path):
    import sentencepiece as spm

    out = imported(sources["spm"], tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(sources["spm"] / "tokenizer.model"))
    _, tok = load(out)
    for text in [*TEXTS[:3], " a leading space", "Human: How do I bake bread?"]:
        assert tok.encode(text) == [sp.bos_id(), *sp.encode(text)], text  # llama adds BOS
        assert tok.decode(sp.encode(text)) == text
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")


# ---- the cache and the command ---------------------------------------------------------------


def test_cached_import_is_keyed_by_content(sources, tmp_path, cache, monkeypatch):
    path = write_gguf(sources["llama"], tmp_path / "a.gguf", Q.Q8_0)
    first = G.cached_gguf_model(path)
    assert first.parent == cache / "models" and (first / "model.safetensors").is_file()
    copy = tmp_path / "elsewhere" / "b.gguf"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    monkeypatch.setattr(G, "import_gguf", lambda *a, **k: pytest.fail("imported twice"))
    assert G.cached_gguf_model(copy) == first  # the same content under another name
    # the hash of an unchanged file is remembered, not recomputed
    monkeypatch.setattr(G.hashlib, "sha256", lambda: pytest.fail("hashed twice"))
    assert G.cached_gguf_model(path) == first


def test_models_import_prints_the_directory(sources, tmp_path, cache, capsys):
    path = write_gguf(sources["llama"], tmp_path / "a.gguf")
    assert main(["models", "import", str(path)]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out.parent == cache / "models" and load(out)[1].encode("hi")
    assert main(["models", "import", str(path), "--out", str(tmp_path / "mine")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "mine")
    assert (tmp_path / "mine" / "tokenizer.json").is_file()


def _bad_file(kind: str, sources: dict, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.gguf"
    if kind == "not-gguf":
        path.write_text("this is a text file, not a model\n")
    elif kind in ("truncated-header", "truncated-data"):
        data = write_gguf(sources["llama"], tmp_path / "full.gguf").read_bytes()
        path.write_bytes(data[:300] if kind == "truncated-header" else data[:-100])
    elif kind == "architecture":
        write_gguf(sources["llama"], path, arch="gemma2")
    elif kind == "tensor-type":
        write_gguf(sources["llama"], path, tensor_type=lambda n: Q.Q5_0 if "ffn_up" in n else Q.F32)
    return path


@pytest.mark.parametrize(
    "kind,words",
    [
        ("not-gguf", "not a GGUF file"),
        ("truncated-header", "truncated GGUF file"),
        ("truncated-data", "truncated GGUF file (tensor blk.1.ffn_down.weight ends past"),
        ("architecture", "architecture 'gemma2' is not supported"),
        ("tensor-type", "ffn_up.weight has type Q5_0, which MLX cannot read"),
    ],
)
def test_bad_files_are_one_line_and_leave_the_cache_clean(sources, tmp_path, cache, capsys, kind, words):
    path = _bad_file(kind, sources, tmp_path)
    assert main(["models", "import", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and words in err, err
    assert not (cache / "models").exists() or not any((cache / "models").iterdir())


def test_an_output_folder_in_use_is_refused(sources, tmp_path, capsys):
    path = write_gguf(sources["llama"], tmp_path / "a.gguf")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["models", "import", str(path), "--out", str(tmp_path / "busy")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert main(["models", "import", str(path), "--out", str(tmp_path / "empty")]) == 0


def test_a_failed_import_leaves_nothing_behind(sources, tmp_path, monkeypatch):
    path = write_gguf(sources["llama"], tmp_path / "a.gguf")

    def full_disk(folder, weights):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(G, "_save_weights", full_disk)
    with pytest.raises(OSError):
        G.import_gguf(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf"]


def test_read_header_names_the_file(tmp_path):
    with pytest.raises(SamiError, match="GGUF file not found"):
        G.read_header(tmp_path / "missing.gguf")

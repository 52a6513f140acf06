"""Model presets (models/*.yaml), the recipes shipped in sami_mlx/data/recipes, and an estimate
of the memory a SAMI run needs, so a user can tell before downloading 4 GB whether it fits."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from sami_mlx.errors import SamiError
from sami_mlx.fileio import read_structured

PRESET_PACKAGE = "sami_mlx.data.models"  # models/ installs here (pyproject's package-dir)
RECIPE_PACKAGE = "sami_mlx.data.recipes"
# Every memory figure sami-mlx shows or logs is in GiB (2**30 bytes), labelled "GiB": what macOS sells
# as a "16 GB" Mac has 16 GiB. Keys ending in _gb (peak_memory_gb, --memory-gb, ...) hold GiB too.
GiB = 2**30
GB = GiB  # the older name, kept for callers
CHARS_PER_TOKEN = 3.5  # English with a 32k-150k BPE vocabulary is 3.5-4.5; the low end overestimates tokens
RECIPE_DATA_KEYS = ("constitution", "heldout", "template", "generation_template", "training_template")
KINDS = ("base", "instruct")


def _data_dir(package: str, fallback: str) -> Path:
    try:
        return Path(str(resources.files(package)))
    except ModuleNotFoundError:  # a source checkout that was never pip-installed
        return Path(__file__).resolve().parent / fallback


def preset_dir() -> Path:
    """Where the preset YAML files are."""
    return _data_dir(PRESET_PACKAGE, "../models")


def recipe_dir() -> Path:
    """Where the shipped recipe YAML files are."""
    return _data_dir(RECIPE_PACKAGE, "data/recipes")


# ---- model shapes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers the memory estimate needs (names as in a model's config.json)."""

    layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int = 1
    experts_per_token: int = 1
    tied_embeddings: bool = False
    bits: int = 16  # bits per weight: 4 or 8 (quantized), 16 (bf16/fp16) or 32
    group_size: int = 64
    scale_bytes: int = 2  # each quantization group's scale and bias: fp16/bf16 as shipped, fp32 upcast
    float_bytes: int = 0  # activations, norms and unquantized weights; 0: fp32 if bits == 32, else 16-bit

    @classmethod
    def from_config(cls, config: dict, bits: int | None = None) -> ModelShape:
        """Read a Hugging Face / mlx-lm config.json (or a preset's `architecture`, same names)."""
        try:
            h, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            quant = config.get("quantization") or config.get("quantization_config") or {}
            dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
            return cls(
                layers=int(config["num_hidden_layers"]),
                hidden_size=h,
                intermediate_size=int(config["intermediate_size"]),
                vocab_size=int(config["vocab_size"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or h // heads),
                experts=int(config.get("num_local_experts") or config.get("num_experts") or 1),
                experts_per_token=int(config.get("num_experts_per_tok") or 1),
                tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                bits=int(bits or quant.get("bits") or (32 if dtype == "float32" else 16)),
                group_size=int(quant.get("group_size") or 64),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SamiError(f"model config: missing or bad architecture field ({e})") from None

    @property
    def parameters(self) -> int:
        """Parameter count (norms and biases left out: well under 0.1%)."""
        h, q, kv = self.hidden_size, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = 2 * h * q + 2 * h * kv
        mlp = 3 * h * self.intermediate_size * self.experts + (h * self.experts if self.experts > 1 else 0)
        embeddings = self.vocab_size * h * (1 if self.tied_embeddings else 2)
        return self.layers * (attention + mlp) + embeddings

    @property
    def bytes_per_weight(self) -> float:
        """Quantized weights carry a scale and a bias (`scale_bytes` each) per group of `group_size`."""
        if self.bits >= 16:
            return self.bits / 8
        return self.bits / 8 + 2 * self.scale_bytes / self.group_size

    @property
    def weight_bytes(self) -> float:
        return self.parameters * self.bytes_per_weight

    @property
    def activation_bytes(self) -> int:
        """Activations run in the float type of the unquantized weights (a quantized model's scales)."""
        return self.float_bytes or (4 if self.bits == 32 else 2)

    def in_float_bytes(self, n: int) -> ModelShape:
        """This shape with its float tensors (and a quantized model's scales) `n` bytes wide, as loaded."""
        return replace(
            self,
            float_bytes=n,
            scale_bytes=n if self.bits < 16 else self.scale_bytes,
            bits=self.bits if self.bits < 16 else 8 * n,
        )

    def block_linears(self, keys: list[str] | None = None) -> list[tuple[int, int, int]]:
        """(in, out, copies) of each linear layer in a block that LoRA adapts (all by default, as mlx-lm)."""
        h, i, E = self.hidden_size, self.intermediate_size, self.experts
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        named = {
            "q_proj": (h, q, 1),
            "k_proj": (h, kv, 1),
            "v_proj": (h, kv, 1),
            "o_proj": (q, h, 1),
            "gate_proj": (h, i, E),
            "up_proj": (h, i, E),
            "down_proj": (i, h, E),
        }
        if E > 1:
            named["gate"] = (h, E, 1)  # the router
        if keys:
            chosen = [named[k.rsplit(".", 1)[-1]] for k in keys if k.rsplit(".", 1)[-1] in named]
            if chosen:
                return chosen
        return list(named.values())

    def describe(self) -> str:
        quant = f"{self.bits}-bit" if self.bits < 16 else {16: "16-bit", 32: "fp32"}.get(self.bits, f"{self.bits}-bit")
        if self.bits < 16 and self.scale_bytes == 4:
            quant += " with fp32 scales"
        moe = f", {self.experts} experts" if self.experts > 1 else ""
        return f"{format_count(self.parameters)} parameters, {quant}{moe}"


def format_count(n: float) -> str:
    """A parameter count as people write it: 7.2B, 494M, 168K."""
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


# ---- presets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """One models/<name>.yaml: which weights, what kind of model, how to prompt and train it."""

    name: str
    kind: str  # base | instruct
    source: str  # hub | local-recipe
    hub_id: str | None
    description: str
    prompt_style: str
    context_length: int
    quantization: str
    memory_gb: float  # the weights in memory
    lora: dict
    shape: ModelShape | None
    data: dict = field(repr=False)

    @property
    def model(self) -> str:
        """What `--model` resolves this preset to (the hub id, or the preset name for local recipes)."""
        return self.hub_id or self.name


def preset_names() -> list[str]:
    """The names of the shipped presets, sorted."""
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def load_preset(name: str = "toy-world") -> dict:
    """A preset's YAML as written (what sami_mlx.toy.demo reads for the toy world)."""
    path = preset_dir() / f"{name}.yaml"
    if name not in preset_names():
        raise SamiError(f"unknown model preset {name!r}; choose one of {', '.join(preset_names())}")
    data = read_structured(path, "model preset")
    if not isinstance(data, dict):
        raise SamiError(f"{path}: a model preset must be a mapping of settings")
    return data


def get_preset(name: str) -> Preset:
    """A preset by name, checked; raises SamiError naming the file and field."""
    data = load_preset(name)
    where = preset_dir() / f"{name}.yaml"
    for key in ("kind", "source", "prompt_style", "context_length", "quantization", "memory_gb", "lora"):
        if key not in data:
            raise SamiError(f"{where}: missing '{key}'")
    if data["kind"] not in KINDS:
        raise SamiError(f"{where}: kind {data['kind']!r} must be one of {', '.join(KINDS)}")
    hub_id = data.get("hub_id")
    if data["source"] == "hub" and not (isinstance(hub_id, str) and hub_id.count("/") == 1):
        raise SamiError(f"{where}: a hub preset needs hub_id: org/name")
    return Preset(
        name=name,
        kind=data["kind"],
        source=data["source"],
        hub_id=hub_id,
        description=str(data.get("description", "")).strip(),
        prompt_style=str(data["prompt_style"]),
        context_length=int(data["context_length"]),
        quantization=str(data["quantization"]),
        memory_gb=float(data["memory_gb"]),
        lora=dict(data["lora"]),
        shape=_preset_shape(data, where),
        data=data,
    )


def list_presets() -> list[Preset]:
    """Every shipped preset, checked."""
    return [get_preset(n) for n in preset_names()]


def _preset_shape(data: dict, where: Path) -> ModelShape | None:
    bits = {"4bit": 4, "8bit": 8, "bf16": 16, "fp16": 16, "none": None, "fp32": 32}.get(str(data["quantization"]))
    if "architecture" in data:
        return ModelShape.from_config(data["architecture"], bits)
    recipe = data.get("recipe")
    if isinstance(recipe, dict) and "hidden_size" in recipe:  # the toy world: built in fp32 from its recipe
        return ModelShape.from_config(
            {
                "num_hidden_layers": recipe["layers"],
                "hidden_size": recipe["hidden_size"],
                "intermediate_size": recipe["intermediate_size"],
                "vocab_size": recipe["vocab_size"],
                "num_attention_heads": recipe["heads"],
                "tie_word_embeddings": True,
                "torch_dtype": "float32",
            }
        )
    return None


def model_for_preset(name: str) -> str | None:
    """What `--model NAME` loads when NAME is a preset: its hub id, or the built toy model's directory."""
    if name not in preset_names():
        return None
    preset = get_preset(name)
    if preset.source == "local-recipe":
        from sami_mlx.toy.pretrain import ensure_toy_model

        return str(ensure_toy_model(preset.data["recipe"]))
    return preset.hub_id


def model_shape(model: str) -> tuple[ModelShape | None, str]:
    """The architecture of `--model` (a preset, a local directory, or a hub id whose config.json is
    cached), read offline; with a label saying where it came from."""
    if model in preset_names():
        p = get_preset(model)
        return p.shape, f"{model} = {p.model}" if p.hub_id else model
    for p in list_presets():
        if p.hub_id and p.hub_id == model:
            return p.shape, f"{model} (preset {p.name})"
    config_path = Path(model).expanduser() / "config.json"
    if not config_path.is_file() and model.count("/") == 1 and not Path(model).expanduser().exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
            config_path = Path(cached) if isinstance(cached, str) else config_path
        except Exception:  # an id the cache cannot even look up: no estimate, not an error
            pass
    if config_path.is_file():
        config = read_structured(config_path, "model config")
        return ModelShape.from_config(config if isinstance(config, dict) else {}), model
    return None, model


# ---- memory estimate -------------------------------------------------------------------------


@dataclass(frozen=True)
class RunShape:
    """The settings of a run that decide its memory."""

    variants: int = 2
    prompt_tokens: int = 512
    response_tokens: int = 350
    groups_per_micro_batch: int = 1
    gen_batch_size: int = 32
    lora_rank: int = 8
    lora_layers: int = 16
    lora_keys: list[str] | None = None
    optimizer: str = "adamw"
    naive: bool = False  # all N² sequences in one batch (also what --grad-checkpoint uses)
    grad_checkpoint: bool = False
    kl: bool = False
    anchor: bool = False  # --anchor-beta: the responses once more after prompts with no constitution
    # Metal's fused attention keeps no score matrices for the backward pass, which rebuilds them
    # one block at a time; the CPU backend keeps them for every block.
    fused_attention: bool = field(default_factory=lambda: sys.platform == "darwin")

    @classmethod
    def from_config(cls, cfg: Any, variants: int, prompt_tokens: int) -> RunShape:
        return cls(
            variants=variants,
            prompt_tokens=prompt_tokens,
            response_tokens=cfg.max_tokens,
            groups_per_micro_batch=math.ceil(cfg.queries_per_step / cfg.grad_accumulation),
            gen_batch_size=cfg.gen_batch_size,
            lora_rank=cfg.lora_rank,
            lora_layers=cfg.lora_layers,
            lora_keys=cfg.lora_keys,
            optimizer=cfg.optimizer,
            naive=cfg.scoring == "naive" or cfg.grad_checkpoint,
            grad_checkpoint=cfg.grad_checkpoint,
            kl=cfg.kl_beta > 0,
            anchor=cfg.anchor_beta > 0,
        )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by what holds them; training and sampling never hold their buffers at the same time."""

    weights: float
    adapters: float  # LoRA weights, gradients and optimizer state (fp32)
    training: float  # activations kept for the backward pass of one micro-batch, logits, KV caches
    sampling: float  # the generation batch's KV cache and prefill
    overhead: float = 0.5 * GB

    @property
    def peak(self) -> float:
        return self.weights + self.adapters + max(self.training, self.sampling) + self.overhead

    @property
    def training_peak(self) -> float:
        """What a training step holds at its peak, without the fixed overhead: what it logs."""
        return self.weights + self.adapters + self.training

    def summary(self) -> str:
        return (
            f"weights {_gb(self.weights)} + adapters {_gb(self.adapters)} + training {_gb(self.training)} "
            f"(sampling {_gb(self.sampling)}) + overhead {_gb(self.overhead)} = about {_gb(self.peak)} peak"
        )


def _gb(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def lora_parameters(shape: ModelShape, run: RunShape) -> int:
    """Trainable LoRA parameters: rank × (in + out) per adapted linear, per expert for MoE layers."""
    adapted = shape.layers if run.lora_layers <= 0 else min(run.lora_layers, shape.layers)
    per_block = sum(run.lora_rank * (i + o) * n for i, o, n in shape.block_linears(run.lora_keys))
    return adapted * per_block


# Measured on the CPU backend (tests/test_memory.py): per logit, beyond the logits themselves, the
# step holds about 16 bytes (an fp32 copy, log-softmax and its gradient); with --grad-checkpoint each
# block keeps about 6 hidden-size vectors per token (its input and output, the checkpoint's saved
# residuals and the cotangent), not the one a checkpoint needs in principle, and the backward pass
# can hold two blocks' rebuilt activations at once.
LOGIT_BYTES = 16
CHECKPOINT_KEPT = 6
CHECKPOINT_REBUILT = 2


def estimate_memory(shape: ModelShape, run: RunShape) -> MemoryEstimate:
    """Peak memory of a SAMI run, estimated from the architecture and the run's settings.

    Parameters x bytes per weight, plus fp32 LoRA weights with gradients and optimizer state, plus
    the larger of: training activations for one micro-batch of N² (prompt, response) pairs, or the
    sampling batch's KV cache. A model, not a measurement: each step logs `peak_memory_gb` (GiB), and
    tests/test_memory.py and benchmarks/memory.py check the one against the other.
    """
    a, N, P, R, g = (
        shape.activation_bytes,
        run.variants,
        run.prompt_tokens,
        run.response_tokens,
        run.groups_per_micro_batch,
    )
    h, V, heads = shape.hidden_size, shape.vocab_size, shape.heads
    q, kv = heads * shape.head_dim, shape.kv_heads * shape.head_dim
    adapted = shape.layers if run.lora_layers <= 0 else min(run.lora_layers, shape.layers)
    states = 2 if run.optimizer == "adamw" else 1
    adapters = lora_parameters(shape, run) * 4 * (2 + states)

    # Kept per token in each adapted block for the backward pass: the residual stream and norms,
    # q/k/v (before and after RoPE) and the attention output, and the MLP's gate, up, the activation's
    # sigmoid, the activation and the product (per active expert).
    per_token_layer = a * (6 * h + 3 * q + 3 * kv + 5 * shape.intermediate_size * shape.experts_per_token)
    kv_token = 2 * kv * a * shape.layers  # one token's keys and values over all layers
    if run.naive:
        tokens = N * N * (P + R)
        scores = N * N * heads * (P + R) ** 2 * 2 * a  # attention scores and probabilities
        logits = N * N * (P + R) * V * (a + LOGIT_BYTES)
        caches = 0
    else:  # shared: N prompt passes, then N responses against each prompt's repeated KV cache
        tokens = N * P + N * N * R
        scores = N * heads * (P * P + N * R * (P + R)) * 2 * a
        logits = N * N * R * V * (a + LOGIT_BYTES) + N * P * V * a
        caches = N * N * (P + R) * kv_token
    score_layers = 1 if run.fused_attention else adapted
    if run.grad_checkpoint:  # a few vectors per block are kept; blocks are rebuilt one or two at a time
        rebuilt = min(CHECKPOINT_REBUILT, adapted)
        kept = g * (tokens * adapted * CHECKPOINT_KEPT * h * a + rebuilt * (tokens * per_token_layer + scores))
    else:
        kept = g * (adapted * tokens * per_token_layer + score_layers * scores)
    training = kept + g * (logits + caches)
    # The KL terms run N sequences once more, with and without adapters (counted at full prompt length):
    # the logits of both passes, and the activations the policy pass keeps for the backward pass.
    kl_tokens = (run.kl + run.anchor) * g * N * (P + R)
    kl_kept = adapted * (CHECKPOINT_KEPT * h * a if run.grad_checkpoint else per_token_layer)
    training += kl_tokens * (V * (a + LOGIT_BYTES) * 2 + kl_kept)
    prefill = min(run.gen_batch_size, 8) * heads * P * P * 2 * a
    sampling = run.gen_batch_size * (P + R) * kv_token + prefill + run.gen_batch_size * V * 4
    if a == 2:  # measured: LoRA's fp32 weights promote part of a 16-bit model's saved activations to fp32
        training *= 1.3
    slack = 1.1  # the allocator's cache and fragmentation
    return MemoryEstimate(shape.weight_bytes, adapters, training * slack, sampling * slack)


def preset_estimate(preset: Preset, run: RunShape | None = None) -> MemoryEstimate | None:
    """The memory estimate for a preset with its recommended LoRA settings and the recipes' shape
    (2 variants, 350-token responses, 512-token prompts, one query group per micro-batch)."""
    if preset.shape is None:
        return None
    run = run or RunShape(lora_rank=int(preset.lora.get("rank", 8)), lora_layers=int(preset.lora.get("layers", 16)))
    return estimate_memory(preset.shape, run)


# ---- this machine ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MachineMemory:
    total: float
    usable: float  # what MLX can use without swapping (Metal's working-set limit on macOS)


def machine_memory(total_gb: float | None = None) -> MachineMemory:
    """This machine's memory, or `total_gb` to plan for another one."""
    if total_gb:
        total = total_gb * GB
    else:
        try:
            total = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            total = 0.0
    if sys.platform != "darwin":
        return MachineMemory(total, total)
    if not total_gb:
        try:
            import mlx.core as mx

            info = mx.device_info()
            total = float(info.get("memory_size", total))
            if info.get("max_recommended_working_set_size"):
                return MachineMemory(total, float(info["max_recommended_working_set_size"]))
        except Exception:  # an mlx without device_info: fall back to Metal's usual share
            pass
    # Metal lets the GPU wire about two thirds of a small Mac's memory and three quarters of a large one's.
    return MachineMemory(total, total * (0.75 if total >= 36 * GB else 0.67))


def fit(need: float, machine: MachineMemory) -> str:
    """'yes', 'tight' (over what MLX may use but under the memory: swapping, slow) or 'no'."""
    if not machine.total:
        return "?"
    return "yes" if need <= machine.usable else "tight" if need <= machine.total else "no"


# ---- recipes ---------------------------------------------------------------------------------


def recipe_names() -> list[str]:
    """The shipped recipes, runnable as `sami-mlx train -c NAME`."""
    return sorted(p.stem for p in recipe_dir().glob("*.yaml"))


def find_recipe(name: str) -> dict | None:
    """The settings of shipped recipe `name`, with its data files resolved; None if `name` is a file.

    Paths in a shipped recipe are relative to the package's data folder (sami_mlx/data), so a
    recipe runs from any working directory.
    """
    if Path(name).expanduser().exists():
        return None
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if stem not in recipe_names():
        if "/" not in name and os.sep not in name and not Path(name).suffix:
            raise SamiError(
                f"-c {name}: config file not found, and no shipped recipe has that name; "
                f"recipes: {', '.join(recipe_names())}"
            )
        return None
    path = recipe_dir() / f"{stem}.yaml"
    data = read_structured(path, "recipe")
    if not isinstance(data, dict):
        raise SamiError(f"{path}: a recipe must be a mapping of settings")
    data_dir = recipe_dir().parent
    for key in RECIPE_DATA_KEYS:
        value = data.get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and (data_dir / value).is_file():
            data[key] = str(data_dir / value)
    return data


# ---- what --dry-run prints -------------------------------------------------------------------


def _cpu_backend() -> bool:
    try:
        import mlx.core as mx

        return mx.default_device() == mx.cpu
    except Exception:  # no MLX backend at all: plan as for a GPU
        return False


def _weights_float_bytes(path: Path) -> int | None:
    """The float width of a local model's weights, read from a safetensors header (its scales' for a
    quantized model): a config.json often leaves torch_dtype out."""
    import json
    import struct

    widths = {"F32": 4, "F16": 2, "BF16": 2}
    for file in sorted(path.glob("*.safetensors"))[:1]:
        try:
            with open(file, "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        except (OSError, ValueError, struct.error):
            return None
        tensors = {k: v for k, v in header.items() if isinstance(v, dict) and "dtype" in v}
        scales = [v["dtype"] for k, v in tensors.items() if k.endswith(".scales")]
        floats = scales or [v["dtype"] for v in tensors.values() if v["dtype"] in widths]
        return widths.get(floats[0]) if floats else None
    return None


def model_dir_at_hand(model: str) -> Path | None:
    """A local directory with `model`'s files (a directory, a built toy model, a cached hub snapshot),
    found without downloading or building anything; None if there is none."""
    if model in preset_names():
        preset = get_preset(model)
        if preset.source == "local-recipe":
            from sami_mlx.toy.pretrain import toy_model_dir

            built = toy_model_dir(preset.data["recipe"])
            return built if (built / "config.json").is_file() else None
        model = preset.model
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True, allow_patterns=["*.json", "*.model", "*.txt"]))
    except Exception:  # not cached: the estimate falls back to characters
        return None


def tokenizer_at_hand(model: str):
    """`model`'s tokenizer if its files are on this machine, else None (never downloads)."""
    path = model_dir_at_hand(model)
    if path is None or not any(path.glob("tokenizer*")):
        return None
    try:
        from mlx_lm.utils import load_tokenizer

        return load_tokenizer(path)
    except Exception:  # an unreadable tokenizer: the estimate falls back to characters
        return None


def prompt_tokens(inputs: Any, tokenizer: Any = None, chat_template: bool = False) -> tuple[int, int]:
    """Typical (median) and longest prompt length in tokens: counted with `tokenizer` when given (as
    the run counts them before its memory check), else estimated from characters.

    Each query's prompt is its longest under the run's templates with every principle in its
    longer wording, as `trainer.check_context` measures it."""
    from sami_mlx.inputs.constitution import Constitution, Principle
    from sami_mlx.inputs.prompts import encode_prompt

    c = inputs.constitution
    longest = Constitution(
        c.name, tuple(Principle(p.name, *(2 * [max(p.positive, p.negative, key=len)])) for p in c.principles)
    )
    text = longest.render(longest.positive_variant)
    templates = {inputs.generation_template, inputs.training_template, getattr(inputs, "anchor_template", None)}
    templates.discard(None)
    if tokenizer is not None:
        lengths = sorted(
            max(len(encode_prompt(tokenizer, t.fill(text, q), chat_template)) for t in templates)
            for q in inputs.queries
        )
        return lengths[len(lengths) // 2], lengths[-1]
    lengths = sorted(max(len(t.fill(text, q)) for t in templates) for q in inputs.queries)
    return (math.ceil(lengths[len(lengths) // 2] / CHARS_PER_TOKEN), math.ceil(lengths[-1] / CHARS_PER_TOKEN))


def dry_run_report(cfg: Any, inputs: Any, total_gb: float | None = None) -> str:
    """What a run would do and the memory it needs, as '# ' comment lines."""
    its = range(cfg.iterations)
    steps = [cfg.steps_in_iteration(t) for t in its]
    schedule = (
        "paper schedule: adapters re-initialised from the base model each iteration"
        if cfg.schedule == "paper"
        else "continue schedule: one set of adapters trained throughout"
    )
    sampling = "greedy" if cfg.temperature == 0 else f"temperature {cfg.temperature}"
    halves = ", alternating two disjoint halves of them" if cfg.schedule == "paper" else ""
    micro = math.ceil(cfg.queries_per_step / cfg.grad_accumulation)
    lines = [
        f"plan: {cfg.iterations} iterations, {schedule}; {' + '.join(map(str, steps))} = {sum(steps)} optimizer steps",
        f"sampling: {' / '.join(str(s * cfg.queries_per_step) for s in steps)} queries per iteration × "
        f"{inputs.num_variants} variants ({sampling}, up to {cfg.max_tokens} new tokens) from "
        f"{len(inputs.queries)} queries{halves}",
        f"training: {cfg.queries_per_step} query groups per step ({inputs.num_variants}×{inputs.num_variants} "
        f"score matrices) in {cfg.grad_accumulation} micro-batch(es) of {micro}; {cfg.optimizer}, "
        f"learning rate {cfg.learning_rate:g}, LoRA rank {cfg.lora_rank} on {{blocks}}",
    ]
    # Iteration t reads [(t // 2) * count, (t // 2 + 1) * count) of its half (trainer.queries_for_iteration).
    counts = [s * cfg.queries_per_step for s in steps]
    if cfg.schedule == "paper":
        need = 2 * max((t // 2 + 1) * c for t, c in enumerate(counts))
    else:
        need = sum(counts)
    if len(inputs.queries) < need:
        lines.append(
            f"note: {len(inputs.queries)} queries are fewer than the {need} this schedule samples, "
            f"so queries repeat across iterations; give at least {need} for none to repeat"
        )
    shape, label = model_shape(cfg.model)
    if shape is not None:
        adapted = shape.layers if cfg.lora_layers <= 0 else min(cfg.lora_layers, shape.layers)
        blocks = f"{adapted} of the model's {shape.layers} blocks"
    else:
        blocks = "all blocks" if cfg.lora_layers <= 0 else f"the last {cfg.lora_layers} blocks"
    lines[2] = lines[2].replace("{blocks}", blocks)
    tokenizer = tokenizer_at_hand(cfg.model)
    typical, longest = prompt_tokens(inputs, tokenizer, cfg.chat_template)
    how = (
        "counted with the model's tokenizer"
        if tokenizer is not None
        else "estimated from characters: the model's tokenizer is not on this machine yet"
    )
    lines.append(f"prompts: {typical} tokens typically, the longest {longest} ({how})")
    if shape is None:
        lines.append(f"model: {label}; memory: unknown offline (no preset and no cached config.json for it)")
        return "\n".join("# " + line for line in lines)
    path = model_dir_at_hand(cfg.model)
    wide = _weights_float_bytes(path) if path is not None else None
    if _cpu_backend() and shape.bits < 16:  # sami_mlx.model.upcast_for_cpu widens the scales at load
        wide = 4
    if wide:
        shape = shape.in_float_bytes(wide)
    lines.append(f"model: {label} ({shape.describe()})")
    est = estimate_memory(shape, RunShape.from_config(cfg, inputs.num_variants, longest))
    lines.append(f"memory (estimate): {est.summary()}")
    machine = machine_memory(total_gb)
    if machine.total:
        verdict = {
            "yes": "fits",
            "tight": "over what MLX can use without swapping: expect it to be slow",
            "no": "does not fit",
        }[fit(est.peak, machine)]
        lines.append(f"this machine: {_gb(machine.total)} (MLX can use about {_gb(machine.usable)}): {verdict}")
        if fit(est.peak, machine) != "yes":
            lines.append(
                "to need less: --grad-accumulation (fewer query groups per micro-batch), --grad-checkpoint, "
                "fewer --lora-layers, a lower --max-tokens or --gen-batch-size, or a smaller model"
            )
    return "\n".join("# " + line for line in lines)

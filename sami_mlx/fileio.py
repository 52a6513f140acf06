"""Reading user files with clear errors, and writing run files atomically."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from sami_mlx.errors import SamiError

MAX_INPUT_BYTES = 16 * 1024 * 1024


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """Read a UTF-8 text file a user gave us, or raise a one-line SamiError."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SamiError(f"{p}: {what} not found; check the path")
    if p.is_dir():
        raise SamiError(f"{p}: is a directory, expected a {what}")
    size = p.stat().st_size
    if size > MAX_INPUT_BYTES:
        raise SamiError(
            f"{p}: {what} is {size / 2**20:.0f} MB, over the {MAX_INPUT_BYTES // 2**20} MB limit; use a smaller file"
        )
    try:
        return p.read_bytes().decode("utf-8-sig")  # a BOM from Windows editors is not content
    except UnicodeDecodeError as e:
        raise SamiError(f"{p}: not valid UTF-8 (byte {e.start}); save the {what} as UTF-8") from None


def read_structured(path: str | os.PathLike, what: str = "file") -> Any:
    """Parse a JSON or YAML file (by extension; YAML also reads JSON) with a clear error."""
    text = read_text(path, what)
    p = Path(path)
    try:
        if p.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.load(text, Loader=_Loader)
    except json.JSONDecodeError as e:
        raise SamiError(f"{p}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "could not parse"
        raise SamiError(f"{p}: invalid YAML{where}: {problem}") from None


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; like mlx-lm, read such exponents as floats."""


class _Dumper(yaml.SafeDumper):
    """Quotes every string that _Loader would read back as a float (`0E0`, `1e5`)."""


def dump_yaml(data: Any) -> str:
    """YAML that read_structured reads back to the same values (keys in their order)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


_FLOAT = (
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)
_Loader.add_implicit_resolver(*_FLOAT)
_Dumper.add_implicit_resolver(*_FLOAT)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that a crash leaves either the old or the new content, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict) -> None:
    """Write MLX arrays as a .safetensors file atomically (fsynced, then renamed over `path`)."""
    import mlx.core as mx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mx.save_safetensors appends the suffix itself, so the temporary name must already end with it.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), tensors)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write an object as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON line and fsync; a torn last line is skipped by readers."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL log, skipping a torn final line left by a crash."""
    rows: list[dict] = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def json_lines(text: str, source: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line of a user's JSONL file; a line that is not
    JSON is a one-line SamiError naming `source` and the line."""
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise SamiError(f"{source}: line {n} is not valid JSON ({e.msg}); fix or remove it") from None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

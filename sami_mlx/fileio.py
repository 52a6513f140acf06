"""Reading user files with clear errors, and writing run files atomically."""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass
class EditableFile:
    """A JSON or YAML file read to be changed and written back: `data` keeps the file's key order and
    unknown keys, and for YAML its comments and quoting too (ruamel.yaml's round-trip types, which are
    dicts, lists and strs); `indent` is the layout to write it back in."""

    data: Any
    is_json: bool
    indent: tuple[int, int, int]  # JSON: (indent, 0, 0); YAML: ruamel's (mapping, sequence, offset)


def read_editable(path: str | os.PathLike, what: str = "file") -> EditableFile:
    """Read a user's JSON or YAML file for editing in place (see EditableFile), with clear errors."""
    text = read_text(path, what)
    p = Path(path)
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SamiError(f"{p}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        step = re.search(r"^( +)\S", text, re.M)
        return EditableFile(data, True, (len(step.group(1)) if step else 2, 0, 0))
    from ruamel.yaml.error import YAMLError

    indent = _yaml_indent(text)
    try:
        data = _round_trip(indent).load(text)
    except YAMLError as e:
        raise SamiError(f"{p}: invalid YAML: {getattr(e, 'problem', None) or 'could not parse'}") from None
    return EditableFile(data, False, indent)


def dump_editable(file: EditableFile, as_json: bool | None = None) -> str:
    """The text of an EditableFile: unchanged parts as they were read. `as_json` converts (JSON holds
    no comments, so YAML written as JSON loses them; JSON written as YAML uses dump_yaml)."""
    as_json = file.is_json if as_json is None else as_json
    if as_json:
        step = file.indent[0] if file.is_json else 2
        return json.dumps(file.data, indent=step, ensure_ascii=False) + "\n"
    if file.is_json:
        return dump_yaml(file.data)
    out = io.StringIO()
    _round_trip(file.indent).dump(file.data, out)
    return out.getvalue()


def yaml_scalar(value: str, like: object = None) -> str:
    """`value` as a YAML string to put into an EditableFile: in the quoting style of `like` (the value
    it replaces), and quoted wherever read_structured would read it as something else (`no`, `1e5`)."""
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString, ScalarString, SingleQuotedScalarString

    if isinstance(like, ScalarString):
        return type(like)(value)
    plain = dump_yaml(value)
    if plain.startswith("'"):
        return SingleQuotedScalarString(value)
    if plain.startswith('"'):
        return DoubleQuotedScalarString(value)
    return value


def _round_trip(indent: tuple[int, int, int]) -> Any:
    from ruamel.yaml import YAML

    rt = YAML()  # round-trip: comments, key order, flow style and (with preserve_quotes) quoting kept
    rt.preserve_quotes = True
    rt.allow_duplicate_keys = True  # as PyYAML, which the engine reads with, allows them
    rt.width = 4096  # long wordings stay on one line, as they were written
    rt.indent(mapping=indent[0], sequence=indent[1], offset=indent[2])
    return rt


def _yaml_indent(text: str) -> tuple[int, int, int]:
    """The indentation a YAML file uses, from its first block list item and the key below it: `key:` /
    `  - a: 1` / `    b: 2` is (2, 4, 2); ruamel.yaml writes with the defaults unless told."""
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    for above, line in zip(lines, lines[1:]):
        item = re.match(r"^( *)- +(\S)", line)
        parent = re.match(r"^( *)\S.*:\s*(#.*)?$", above)  # the key that holds the list
        if item and parent:
            offset = len(item.group(1)) - len(parent.group(1))
            sequence = item.start(2) - len(parent.group(1))
            return (2, max(sequence, offset + 2), max(offset, 0))
    return (2, 4, 2)


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

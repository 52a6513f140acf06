"""Query sets from the Hugging Face hub, by name: the first human turns of HH-RLHF and the Reddit
posts of the TL;DR summarize-from-feedback comparisons (labels and summaries are discarded).

    hh-rlhf/helpful-base:train[0:2000]     a source, a split and a range (Python slice, no steps)
    tldr:validation[:500]                  the split defaults to train, the range to everything
    hh-rlhf/helpful-base:train[0:1000]+hh-rlhf/harmless-base:train[0:1000]   concatenated

Ranges count unique queries, in the order of the files, so two disjoint ranges are disjoint sets
of prompts. Files come through huggingface_hub into its usual cache, and are read from there offline.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sami_mlx.errors import SamiError

Records = Iterable[dict]


@dataclass(frozen=True)
class DatasetSource:
    """A query set on the hub: which repository files hold each split, and how to read queries out."""

    name: str
    repo_id: str
    files: dict[str, str]  # split -> path in the dataset repository
    parse: Callable[[Records, str], list[str]]
    revision: str | None = None
    description: str = ""
    columns: tuple[str, ...] | None = None  # the only Parquet columns `parse` reads


@dataclass(frozen=True)
class Selection:
    """One `name:split[start:stop]` part of a --queries value."""

    source: DatasetSource
    split: str
    start: int = 0
    stop: int | None = None

    def __str__(self) -> str:
        stop = "" if self.stop is None else self.stop
        return f"{self.source.name}:{self.split}[{self.start}:{stop}]"


# ---- parsing the records ---------------------------------------------------------------------


def first_human_turn(transcript: str) -> str | None:
    """The first 'Human:' turn of an HH-RLHF transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...')."""
    start = transcript.find("Human:")
    if start < 0:
        return None
    text = transcript[start + len("Human:") :]
    ends = [i for i in (text.find("\n\nAssistant:"), text.find("\n\nHuman:")) if i >= 0]
    turn = (text[: min(ends)] if ends else text).strip()
    return turn or None


def hh_first_turns(records: Records, where: str) -> list[str]:
    """Unique first human turns, in file order; 'chosen' and 'rejected' share them, so only
    'chosen' is read and which reply was preferred is never looked at."""
    seen: dict[str, None] = {}
    for n, row in enumerate(records, start=1):
        transcript = row.get("chosen") if isinstance(row, dict) else None
        if not isinstance(transcript, str):
            raise SamiError(f"{where}: record {n} has no 'chosen' transcript; is this an HH-RLHF file?")
        turn = first_human_turn(transcript)
        if turn:
            seen.setdefault(turn, None)
    return list(seen)


def tldr_posts(records: Records, where: str) -> list[str]:
    """Unique Reddit posts (by post id) of summarize-from-feedback comparisons, as
    'Title: ...\\n\\nPost: ...' (the built-in summarization queries' shape). News articles, which
    some validation comparisons rate instead of posts, are skipped."""
    seen: dict[str, str] = {}
    for n, row in enumerate(records, start=1):
        info = row.get("info") if isinstance(row, dict) else None
        if not isinstance(info, dict):
            raise SamiError(f"{where}: record {n} has no 'info' object; is this a summarize-from-feedback file?")
        post = info.get("post")
        if not isinstance(post, str) or not post.strip():
            continue  # a CNN/Daily Mail article, not a post
        key = str(info.get("id") or post)
        if key not in seen:
            title = (info.get("title") or "").strip()
            seen[key] = (f"Title: {title}\n\n" if title else "") + f"Post: {post.strip()}"
    return list(seen.values())


SOURCES = {
    s.name: s
    for s in (
        DatasetSource(
            "hh-rlhf/helpful-base",
            "Anthropic/hh-rlhf",
            {"train": "helpful-base/train.jsonl.gz", "test": "helpful-base/test.jsonl.gz"},
            hh_first_turns,
            description="first human turns of HH-RLHF's helpfulness dialogues",
        ),
        DatasetSource(
            "hh-rlhf/harmless-base",
            "Anthropic/hh-rlhf",
            {"train": "harmless-base/train.jsonl.gz", "test": "harmless-base/test.jsonl.gz"},
            hh_first_turns,
            description="first human turns of HH-RLHF's red-teaming (harmlessness) dialogues",
        ),
        # The repository's main branch holds only a loading script; the hub's own Parquet
        # conversion of the comparisons lives on this revision.
        DatasetSource(
            "tldr",
            "openai/summarize_from_feedback",
            {"train": "comparisons/train/0000.parquet", "validation": "comparisons/validation/0000.parquet"},
            tldr_posts,
            revision="refs/convert/parquet",
            columns=("info",),
            description="unique Reddit posts of the TL;DR summarize-from-feedback comparisons",
        ),
    )
}

_PART = re.compile(r"^(?P<name>[A-Za-z0-9][\w.\-/]*?)(?::(?P<split>\w+))?(?:\[(?P<start>\d*):(?P<stop>\d*)\])?$")


# ---- names -----------------------------------------------------------------------------------


def is_dataset_spec(text: str) -> bool:
    """Whether a --queries value names hub data: a known source, or any `name:split` / `name[a:b]`."""
    parts = text.split("+")
    matches = [_PART.match(p.strip()) for p in parts]
    if not all(matches):
        return False
    return all(m["name"] in SOURCES or m["split"] or m["start"] is not None for m in matches if m)


def parse_spec(text: str) -> list[Selection]:
    """Parse 'name[:split][[start:stop]]' parts joined by '+'; raises SamiError naming the fix."""
    selections = []
    for part in text.split("+"):
        m = _PART.match(part.strip())
        if not m:
            raise SamiError(
                f"--queries {text}: cannot read {part!r}; write NAME:SPLIT[START:STOP], "
                f"e.g. hh-rlhf/helpful-base:train[0:2000]"
            )
        source = SOURCES.get(m["name"])
        if source is None:
            raise SamiError(f"--queries {text}: unknown dataset {m['name']!r}; choose one of {', '.join(SOURCES)}")
        split = m["split"] or "train"
        if split not in source.files:
            raise SamiError(
                f"--queries {text}: {source.name} has no split {split!r}; choose one of {', '.join(source.files)}"
            )
        start = int(m["start"]) if m["start"] else 0
        stop = int(m["stop"]) if m["stop"] else None
        if stop is not None and stop <= start:
            raise SamiError(f"--queries {text}: range [{start}:{stop}] is empty; the end must be after the start")
        selections.append(Selection(source, split, start, stop))
    return selections


# ---- files -----------------------------------------------------------------------------------


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub uses (HF_HUB_CACHE, else HF_HOME/hub, else its default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download_command(source: DatasetSource, split: str) -> str:
    """The `hf download` command that puts a split's file into the hub cache."""
    revision = f" --revision {source.revision}" if source.revision else ""
    return f"hf download {source.repo_id} {source.files[split]} --repo-type dataset{revision}"


def cached_file(source: DatasetSource, split: str) -> Path | None:
    """A split's file if it is in the hub cache, else None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(
        source.repo_id, source.files[split], cache_dir=hub_cache_dir(), revision=source.revision, repo_type="dataset"
    )
    return Path(cached) if isinstance(cached, str) else None


def fetch_file(source: DatasetSource, split: str) -> Path:
    """The local path of a split's file: from the hub cache, downloaded into it first if need be."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    filename, cache, fill = source.files[split], hub_cache_dir(), download_command(source, split)
    # A cached copy is used as it is: no network round trip, and the same queries on every run.
    cached = cached_file(source, split)
    if cached is not None:
        return cached
    try:
        return Path(
            hf_hub_download(
                source.repo_id,
                filename,
                repo_type="dataset",
                revision=source.revision,
                cache_dir=cache,
                local_files_only=_offline(),
            )
        )
    except LocalEntryNotFoundError:
        raise SamiError(
            f"{source.name}:{split}: {filename} of the dataset {source.repo_id} is not in the Hugging Face "
            f"cache ({cache}) and the hub cannot be reached{' (HF_HUB_OFFLINE is set)' if _offline() else ''}; "
            f"connect and run again, or fill the cache with `{fill}` (on another machine, then copy {cache} "
            f"here or point HF_HUB_CACHE at it)"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        raise SamiError(
            f"{source.name}:{split}: the hub has no {filename} in {source.repo_id} "
            f"({type(e).__name__}); the dataset may have moved"
        ) from None
    except OSError as e:
        raise SamiError(
            f"{source.name}:{split}: could not download {filename} from {source.repo_id} ({e}); "
            f"check the network or fill the cache with `{fill}`"
        ) from None


def read_records(path: Path, columns: tuple[str, ...] | None = None) -> Iterator[dict]:
    """The records of a dataset file: JSON lines (optionally gzipped) or Parquet (only `columns`)."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        yield from _parquet_records(path, columns)
        return
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise SamiError(
                        f"{path}: line {n} is not valid JSON ({e.msg}); the file may be "
                        f"damaged: delete it and it will be downloaded again"
                    ) from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise SamiError(f"{path}: cannot read it ({e}); delete it and it will be downloaded again") from None


def _parquet_records(path: Path, columns: tuple[str, ...] | None) -> Iterator[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SamiError(f"{path}: reading Parquet needs pyarrow; install it with `pip install pyarrow`") from None
    try:
        table = pq.read_table(path, columns=list(columns) if columns else None)
    except Exception as e:  # pyarrow's errors have no common base a user can act on differently
        raise SamiError(
            f"{path}: not a readable Parquet file ({e}); delete it and it will be downloaded again"
        ) from None
    yield from table.to_pylist()


# ---- queries ---------------------------------------------------------------------------------


def load_dataset_queries(text: str, fetch: Callable[[DatasetSource, str], Path] = fetch_file) -> list[str]:
    """The queries a --queries value like 'tldr:train[0:2000]' names (fetching files as needed)."""
    queries: list[str] = []
    for sel in parse_spec(text):
        path = Path(fetch(sel.source, sel.split))
        available = sel.source.parse(read_records(path, sel.source.columns), str(path))
        if sel.start >= len(available):
            raise SamiError(
                f"--queries {text}: {sel.source.name}:{sel.split} has {len(available)} unique "
                f"queries, so [{sel.start}:...] selects none; start lower"
            )
        queries.extend(available[sel.start : sel.stop])
    return queries


def cached_dataset_queries(text: str) -> tuple[list[str], int | None, list[Selection]]:
    """What a --queries value gives without downloading (for --dry-run): the queries of its parts whose
    files are in the hub cache, how many queries it names in all (None when a part not yet downloaded has
    no end), and the parts whose files are not there."""
    queries: list[str] = []
    count: int | None = 0
    missing: list[Selection] = []
    for sel in parse_spec(text):
        path = cached_file(sel.source, sel.split)
        if path is None:
            missing.append(sel)
            count = None if count is None or sel.stop is None else count + sel.stop - sel.start
            continue

        def at_hand(source: DatasetSource, split: str, path: Path = path) -> Path:
            return path

        part = load_dataset_queries(str(sel), fetch=at_hand)
        queries.extend(part)
        count = None if count is None else count + len(part)
    return queries, count, missing

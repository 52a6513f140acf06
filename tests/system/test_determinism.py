"""Same seed, same numbers: two `sami-mlx train` processes with the same seed write byte-identical
adapters, samples and metrics (timings aside), and the toy model builds to the same bytes twice."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import TINY_RECIPE, as_flags, pythonpath

# Fields that measure the machine (its clock, its allocator), not the run: identical runs differ there.
MEASURED = {"seconds", "tokens_per_sec", "peak_memory_gb"}


def digests(folder: Path, pattern: str) -> dict[str, str]:
    """sha256 of every file under `folder` matching `pattern`, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob(pattern))
    }


def unmeasured(value):
    """`value` (parsed JSON) without the MEASURED fields, at any depth."""
    if isinstance(value, dict):
        return {k: unmeasured(v) for k, v in value.items() if k not in MEASURED}
    if isinstance(value, list):
        return [unmeasured(v) for v in value]
    return value


def metrics(run: Path) -> list[dict]:
    """RUN/metrics.jsonl without MEASURED fields, the run's own path written RUN (where it went differs)."""
    text = (run / "metrics.jsonl").read_text().replace(json.dumps(str(run))[1:-1], "RUN")
    return unmeasured([json.loads(line) for line in text.splitlines()])


def test_two_train_processes_with_one_seed_write_the_same_bytes(tiny_config, tmp_path):
    runs = []
    for n in (1, 2):
        # Two iterations (the paper schedule re-initialises and alternates splits) with dropout, the
        # monitor checking every step; a different PYTHONHASHSEED each, so set and dict order may differ.
        cfg = tiny_config(
            root=tmp_path,
            out=tmp_path / f"run{n}",
            iterations=2,
            steps=2,
            lora_dropout=0.1,
            monitor_every=1,
            max_ppl_ratio=1000.0,
            seed=3,
        )
        env = {**os.environ, "PYTHONPATH": pythonpath(), "PYTHONHASHSEED": str(n)}
        proc = subprocess.run(
            [sys.executable, "-m", "sami_mlx.cli.main", "train", *as_flags(cfg)],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(Path(cfg.out))
    a, b = runs
    assert digests(a, "*.safetensors") == digests(b, "*.safetensors")
    assert len(digests(a, "*.safetensors")) >= 3  # each iteration's adapters and the latest
    assert digests(a, "samples.jsonl") == digests(b, "samples.jsonl")
    assert metrics(a) == metrics(b)
    assert any(row["event"] == "StepCompleted" for row in metrics(a))


def test_the_toy_model_builds_to_the_same_bytes_twice(tmp_path, monkeypatch):
    """Built twice from one recipe, in fresh caches: the same files byte for byte. (Two ranks build the
    same bytes as one process: test_local_ranks.test_ranks_build_the_toy_model_one_process_builds.)"""
    from sami_mlx.toy.pretrain import ensure_toy_model

    built = []
    for name in ("a", "b"):
        monkeypatch.setenv("SAMI_MLX_CACHE", str(tmp_path / name))
        built.append(digests(ensure_toy_model(TINY_RECIPE), "*"))
    assert "model.safetensors" in built[0] and built[0] == built[1]

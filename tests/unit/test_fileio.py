"""Atomic writes of run files: a failed write leaves the old file and no temporary behind."""

from __future__ import annotations

import mlx.core as mx
import pytest

from sami_mlx.fileio import atomic_save_safetensors


def test_safetensors_are_replaced_whole_and_leave_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "adapters.safetensors"
    atomic_save_safetensors(path, {"w": mx.array([1.0, 2.0])})
    assert mx.load(str(path))["w"].tolist() == [1.0, 2.0]
    atomic_save_safetensors(path, {"w": mx.array([3.0])})
    assert mx.load(str(path))["w"].tolist() == [3.0]

    def crash(*_):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_save_safetensors(path, {"w": mx.array([4.0])})
    assert mx.load(str(path))["w"].tolist() == [3.0]  # the old content, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["adapters.safetensors"]

"""`sami-mlx demo` end to end on a small toy world: pretraining, SAMI and the evaluation raise adherence.
(The world's checker, corpus and win rate are unit tests: tests/unit/test_demo.py.)"""

import json

from helpers import small_preset, tiny_demo_preset


def test_demo_raises_adherence_on_a_small_world(tmp_path, monkeypatch):
    from sami_mlx.toy.demo import run_demo

    monkeypatch.setenv("SAMI_MLX_CACHE", str(tmp_path / "cache"))
    report = run_demo(tmp_path / "run", small_preset())
    print({k: report[k] for k in ("base_adherence", "sami_adherence", "win_rate", "ppl_ratio", "seconds")})
    saved = json.loads((tmp_path / "run" / "demo.json").read_text())
    for key in ("base_adherence", "sami_adherence", "win_rate", "win_rate_ci", "ppl_ratio", "heldout"):
        assert key in saved
    # Only what the seed determines: no clock, no paths (two runs with one seed write the same file).
    assert not {"seconds", "run", "model"} & saved.keys() and saved["base_model"].startswith("toy-world-")
    base, sami = report["base_adherence"]["overall"], report["sami_adherence"]["overall"]
    # Measured on one machine across BLAS paths and loads: +0.09 to +0.23 adherence, 57-67% win rate
    # (the tiny model and its run differ by rounding); an inert SAMI gives about +0 and 50%.
    assert sami >= base + 0.05, (base, sami)
    assert report["win_rate"] > 0.55
    lo, hi = report["win_rate_ci"]
    assert lo <= report["win_rate"] <= hi
    assert report["ppl_ratio"] < 1.3  # the anchor holds plain dialogue near the base (measured 1.00)
    # The run went through the engine: the usual run directory, loadable by mlx-lm.
    assert (tmp_path / "run" / "iter-03" / "adapters.safetensors").exists()
    assert list((tmp_path / "cache" / "models").glob("toy-world-*/model.safetensors"))


def test_the_demo_on_its_default_inputs_warns_of_nothing(tmp_path, monkeypatch):
    """Left to choose its training queries (as the shipped presets do), the demo gives every step slot a
    group of its own under train's paper schedule: no repeated groups, no warning."""
    from sami_mlx import events as ev
    from sami_mlx.toy.demo import run_demo

    monkeypatch.setenv("SAMI_MLX_CACHE", str(tmp_path / "cache"))
    preset = tiny_demo_preset()
    del preset["demo"]["train_queries"]
    del preset["demo"]["sami"]["schedule"]  # train's default: the paper's, alternating two query splits
    preset["demo"]["sami"].update(iterations=3, steps=2, queries_per_step=4, monitor_queries=16)
    seen: list[ev.Event] = []
    run_demo(tmp_path / "run", preset, emit=seen.append)
    assert [e.message for e in seen if isinstance(e, ev.RunWarning)] == []
    ready = [e for e in seen if isinstance(e, ev.SamplesReady)]
    assert [(e.groups, e.repeated) for e in ready] == [(8, 0), (16, 0), (24, 0)]
    queries = (tmp_path / "run" / "inputs" / "queries.jsonl").read_text().splitlines()
    # 24 groups in each of two splits with room for dropped ones, and the monitor's 16.
    assert len(queries) == 2 * 30 + 16

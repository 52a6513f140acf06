"""The degeneration monitor: drift on the base model's own held-out answers, rollback to the last
healthy adapters, the best iteration kept, and dropped groups replaced by fresh queries."""

import dataclasses
import json
import math

import mlx.core as mx
import mlx_lm
import pytest
import yaml
from helpers import WATCHED

import sami_mlx.loop.monitor as monitor
import sami_mlx.loop.sampling as sampling
import sami_mlx.loop.trainer as trainer
from sami_mlx import events as ev
from sami_mlx.cli.train import main
from sami_mlx.config import TrainConfig
from sami_mlx.fileio import read_jsonl
from sami_mlx.loop.adapters import adapter_weights
from sami_mlx.loop.drift import Probe, drift

QUERIES = [f"Tell me about topic number {n}, please." for n in range(120)]


# Of the 120 queries, four held out for the monitor.
MONITORED = dict(seed=5, monitor_queries=4)


@pytest.fixture
def monitored(tiny_config):
    """`monitored(out, *settings, queries=QUERIES, **overrides) -> (result, events)`: a MONITORED run."""

    def run(out, *settings, queries=QUERIES, **overrides):
        seen = []
        cfg = tiny_config(MONITORED, *settings, queries=queries, out=out, **overrides)
        return trainer.train(cfg, callbacks=[seen.append]), seen

    return run


def test_aggressive_run_degenerates_trips_the_monitor_and_keeps_adapters_within_the_limit(
    tiny_model, monitored, tmp_path
):
    """No KL, no anchor and a learning rate far too high: the guard stops the run, and the adapters
    left in RUN/ (reloaded through mlx-lm) are measured within the limit on the base's answers."""
    out = tmp_path / "run"
    result, seen = monitored(
        out, iterations=2, steps=6, learning_rate=5e-2, kl_beta=0.0, anchor_beta=0.0, monitor_every=1, max_ppl_ratio=1.5
    )
    assert result.stopped_early and "less likely" in result.reason
    checks = [e for e in seen if isinstance(e, ev.MonitorChecked)]
    assert checks and not checks[-1].healthy
    assert checks[-1].drift_prompted > 3.0 or checks[-1].drift_plain > 1.5
    state = json.loads((out / "state.json").read_text())
    assert state["finished"] and state["stopped"] == result.reason and state["kept"] == result.kept
    warnings = [e.message for e in seen if isinstance(e, ev.RunWarning)]
    assert warnings[-1] == result.reason and "RUN/adapters.safetensors holds" in warnings[-1]
    done = [e for e in seen if isinstance(e, ev.RunCompleted)][-1]
    assert done.stopped_early and done.adapters == result.kept["name"]

    # Measured independently: what a user loads from RUN is within the limit on the base's answers.
    probe = Probe.load(out / "monitor.json")
    model, _ = mlx_lm.load(str(tiny_model), adapter_path=str(out))
    reading = drift(model, probe)
    assert reading["plain"] <= 1.5 and reading["prompted"] <= 3.0
    # Resuming a run the monitor ended is refused with one line.
    assert main(["--resume", str(out)]) == 2


def test_rollback_restores_exactly_the_last_healthy_step(monitored, tmp_path, monkeypatch):
    """Force the drift past the limit at the third check: RUN/adapters.safetensors then holds, bit
    for bit, the adapters the run had at the second check (step 2 of iteration 1)."""
    snapshots, checks = {}, []
    real_drift, real_checkpoint = monitor.drift, trainer.SamiLoop.save_step_state

    def forced(model, probe, ranks=None):
        checks.append(1)
        reading = real_drift(model, probe, ranks)
        return {k: 5000.0 for k in reading} if len(checks) == 3 else reading

    def checkpoint(self, state):
        snapshots[(state.iteration, state.step)] = {k: mx.array(v) for k, v in adapter_weights(self.model).items()}
        real_checkpoint(self, state)

    monkeypatch.setattr(monitor, "drift", forced)
    monkeypatch.setattr(trainer.SamiLoop, "save_step_state", checkpoint)
    out = tmp_path / "run"
    result, seen = monitored(out, WATCHED, steps=6, learning_rate=1e-3)
    mid = [(e.step, e.healthy) for e in seen if isinstance(e, ev.MonitorChecked)]
    assert mid[:3] == [(1, True), (2, True), (3, False)]
    assert result.stopped_early and "iteration 1, step 3" in result.reason
    kept = mx.load(str(out / "adapters.safetensors"))
    want = snapshots[(0, 2)]
    assert kept.keys() == want.keys() and all(mx.array_equal(kept[k], want[k]).item() for k in kept)
    assert result.kept["name"] == "iter-01 step 2" and result.kept["adapters"] == "healthy"
    # The returned model is the kept one, and the step measured in full joined the iterations.
    live = adapter_weights(result.model)
    assert all(mx.array_equal(live[k], want[k]).item() for k in live)
    partial = result.iterations[-1]
    assert partial["partial"] and partial["step"] == 2 and partial["healthy"] and partial["heldout_mi"] is not None


def test_the_best_healthy_iteration_is_kept_or_the_last_by_flag(monitored, tmp_path):
    runs = {}
    for keep in ("best", "last"):
        settings = dict(iterations=3, steps=1, schedule="continue", learning_rate=1e-2, max_ppl_ratio=None, keep=keep)
        runs[keep], _ = monitored(tmp_path / keep, settings)
    best, last = runs["best"], runs["last"]
    mis = [it["heldout_mi"] for it in best.iterations]
    assert best.kept["iteration"] == 1 + max(range(3), key=lambda i: (mis[i], i))
    assert last.kept["iteration"] == 3
    for keep, result in runs.items():
        got = mx.load(str(tmp_path / keep / "adapters.safetensors"))
        want = mx.load(str(tmp_path / keep / result.kept["adapters"] / "adapters.safetensors"))
        assert all(mx.array_equal(got[k], want[k]).item() for k in got)
        assert json.loads((tmp_path / keep / "state.json").read_text())["kept"]["name"] == result.kept["name"]


def test_monitor_numbers_reach_metrics_and_monitor_queries_never_train(monitored, tmp_path):
    out = tmp_path / "run"
    monitored(out, iterations=2, steps=2, monitor_every=1, max_ppl_ratio=None)
    rows = read_jsonl(out / "metrics.jsonl")
    started = rows[0]
    assert started["monitor_queries"] == 4 and started["base_ppl"] is None  # no --heldout: no query-text ppl
    checks = [r for r in rows if r["event"] == "MonitorChecked"]
    assert [(r["iteration"], r["step"]) for r in checks] == [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3), (2, 4)]
    for r in rows:
        if r["event"] == "IterationCompleted":
            for key in (
                "drift_prompted",
                "drift_plain",
                "heldout_mi",
                "mean_length",
                "limit_rate",
                "distinct_2",
                "repetition",
            ):
                assert isinstance(r[key], float) and math.isfinite(r[key]), key
            assert abs(r["drift_prompted"] - 1) > 1e-4 and abs(r["drift_plain"] - 1) > 1e-4  # the model moved
    probe = json.loads((out / "monitor.json").read_text())
    sampled = {s["query_index"] for it in ("iter-01", "iter-02") for s in read_jsonl(out / it / "samples.jsonl")}
    assert len(probe["query_ids"]) == 4 and not sampled & set(probe["query_ids"])
    assert len(probe["prompted"]) == 4 * 4 and len(probe["plain"]) == 4  # 'auto': all 4 variants of 2 principles


def test_dropped_groups_are_replaced_by_fresh_queries(monitored, tmp_path, monkeypatch):
    """Half of all groups are dropped: more queries are sampled until every step slot has a group of
    its own, none repeated; a split too small to fill the slots says so."""
    real = sampling.filter_groups

    def drop_odd(groups, *filters):
        kept, drops = real(groups, *filters)
        odd = sum(g.query_index % 2 for g in kept)
        return [g for g in kept if g.query_index % 2 == 0], dataclasses.replace(drops, banned=drops.banned + odd)

    monkeypatch.setattr(sampling, "filter_groups", drop_odd)
    out = tmp_path / "run"
    _, seen = monitored(out, iterations=3, steps=2, max_ppl_ratio=None)
    ready = [e for e in seen if isinstance(e, ev.SamplesReady)]
    assert [e.groups for e in ready] == [4, 8, 12] and [e.repeated for e in ready] == [0, 0, 0]
    assert all(e.queries_sampled >= e.groups + e.dropped_banned and e.dropped_banned > 0 for e in ready)
    for it in (1, 2, 3):
        used = [s["query_index"] for s in read_jsonl(out / f"iter-{it:02d}" / "samples.jsonl") if s["kept"]]
        assert len(used) == len(set(used))
    # Paper schedule: iterations 1 and 3 share a split, and 3 continues where 1 stopped.
    first, third = ({s["query_index"] for s in read_jsonl(out / f"iter-0{i}" / "samples.jsonl")} for i in (1, 3))
    assert not first & third
    assert not any(isinstance(e, ev.RunWarning) and "repeat" in e.message for e in seen)

    # 8 queries: 2 held out, 6 to train: 3 per split
    _, seen = monitored(tmp_path / "small", queries=QUERIES[:8], steps=3, max_ppl_ratio=None)
    ready = [e for e in seen if isinstance(e, ev.SamplesReady)][0]
    assert ready.queries_sampled == 3 and ready.repeated == 6 - ready.groups
    warning = next(e.message for e in seen if isinstance(e, ev.RunWarning) and "repeat" in e.message)
    # It says what to change: how many queries the file needs (two splits of 6 groups at this rate, 2 held out).
    enough = sampling.queries_needed(6, ready.groups / 3, 2, 2)
    assert f"{ready.repeated} slots repeat" in warning and enough > 8
    assert f"give about {enough} queries in " in warning and "(it has 8)" in warning


def test_guard_can_be_turned_off_from_flags_and_yaml(tmp_path):
    from sami_mlx.config_file import config_from_file

    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"max_ppl_ratio": "off"}) + "keep: last\n")
    assert config_from_file(str(tmp_path / "c.yaml"))["max_ppl_ratio"] is None
    (tmp_path / "d.yaml").write_text("max-ppl-ratio: off\n")  # YAML reads a bare off as false
    assert config_from_file(str(tmp_path / "d.yaml"))["max_ppl_ratio"] is None
    assert TrainConfig().max_ppl_ratio == 1.5 and TrainConfig().max_prompted_ratio == 10.0
    assert TrainConfig().kl_beta > 0 and TrainConfig().anchor_beta > 0


def test_groups_whose_responses_copy_the_constitution_are_dropped_and_counted(monitored, tmp_path, monkeypatch):
    """A response that repeats a principle's wording tells the variants apart without following them
    (SmolLM2 does this): the sampler's filter gets the run's constitution, drops such groups under their
    own count, and samples fresh queries in their place."""
    real = sampling.filter_groups
    seen_constitutions = []

    def echo_even(groups, *filters):
        constitution, words = filters[-1]
        seen_constitutions.append(constitution)
        for g in groups:
            texts = [f"answer {g.query_index} {n}" for n in range(len(g.generations))]
            if g.query_index % 2 == 0:  # one response says the first principle back: "Be brief."
                texts[0] = f"Sure. I will {constitution.principles[0].positive.lower()}"
            g.generations = [dataclasses.replace(gen, text=t) for gen, t in zip(g.generations, texts)]
        return real(groups, *filters)

    monkeypatch.setattr(sampling, "filter_groups", echo_even)
    out = tmp_path / "run"
    _, seen = monitored(out, iterations=1, steps=2, echo_words=2, max_ppl_ratio=None)
    assert {c.principles[0].positive for c in seen_constitutions} == {"Be brief."}
    ready = [e for e in seen if isinstance(e, ev.SamplesReady)]
    assert ready[0].groups == 4 and ready[0].dropped_echoed >= 4 and ready[0].dropped_banned == 0
    kept = [s["query_index"] for s in read_jsonl(out / "iter-01" / "samples.jsonl") if s["kept"]]
    assert len(kept) == 4 and all(i % 2 == 1 for i in kept)
    row = next(json.loads(line) for line in (out / "metrics.jsonl").open() if '"SamplesReady"' in line)
    assert row["dropped_echoed"] == ready[0].dropped_echoed

"""Stop within seconds, lose nothing: a stop (or Ctrl-C) in the middle of sampling ends the run at once,
the groups already sampled stay in RUN/iter-NN/samples.partial.jsonl, and --resume samples only the rest
(with greedy decoding, to the same samples and adapters as a run never stopped)."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from sami_mlx import events as ev
from sami_mlx.fileio import read_jsonl
from sami_mlx.loop import sampling, trainer
from sami_mlx.loop.trainer import resume, train
from tui.app import SamiApp
from tui.run_screen import RunScreen
from tui.state.runlog import RunView

ROOT = Path(__file__).resolve().parents[2]

# Greedy sampling of many short groups, decoded one group at a time so that groups finish one by one;
# the monitor off (its base answers would only add time).
SLOW_SAMPLING = dict(
    temperature=0.0,
    variants="paper",
    iterations=1,
    steps=2,
    queries_per_step=6,
    max_tokens=16,
    gen_batch_size=2,
    monitor_queries=0,
    max_ppl_ratio=None,
    seed=3,
)
QUERY_LINES = [f"Question {n}: what is {n} plus {n * 7 % 5}?" for n in range(32)]


@pytest.fixture(scope="module")
def greedy_model(model_builder, tmp_path_factory) -> Path:
    """A tiny model whose greedy answers depend on the prompt: the random weights scaled up 4x (at the
    fixture's scale every variant's greedy answer repeats one token, and every group would be dropped)."""
    out = model_builder(tmp_path_factory.mktemp("models") / "greedy", seed=0)
    weights = mx.load(str(out / "model.safetensors"))
    mx.save_safetensors(str(out / "model.safetensors"), {k: v if "norm" in k else v * 4 for k, v in weights.items()})
    return out


@pytest.fixture(scope="module")
def uninterrupted(tiny_config, greedy_model, tmp_path_factory) -> Path:
    """The run never stopped, to compare with."""
    cfg = tiny_config(
        SLOW_SAMPLING, model=greedy_model, queries=QUERY_LINES, out=tmp_path_factory.mktemp("full") / "run"
    )
    train(cfg)
    return Path(cfg.out)


def counting_generation(monkeypatch) -> list[int]:
    """Count the prompts sampling sends to the model (one count per generate_batch call)."""
    calls: list[int] = []
    real = sampling.generate_batch

    def generate(model, tokenizer, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(sampling, "generate_batch", generate)
    return calls


def partial_rows(run: Path) -> list[dict]:
    return [r for r in read_jsonl(run / "iter-01" / sampling.PARTIAL) if "slot" in r]


def assert_resumes_to_the_uninterrupted_run(run: Path, full: Path, monkeypatch) -> None:
    """Resume `run` (stopped mid-sampling): no finished group is sampled again, and the run ends as `full` did."""
    saved = partial_rows(run)
    expected = len(read_jsonl(full / "iter-01" / "samples.jsonl"))
    assert 0 < len(saved) < expected, "the stop should land in the middle of the sampling"
    calls = counting_generation(monkeypatch)
    seen: list[ev.GroupSampled] = []
    result = resume(run, callbacks=[lambda e: seen.append(e) if isinstance(e, ev.GroupSampled) else None])
    assert not result.stopped_early
    assert sum(calls) == 2 * (expected - len(saved))  # two variants per group, only the unfinished groups
    assert [e.resumed for e in seen] == [True] * len(saved) + [False] * (expected - len(saved))
    assert [e.done for e in seen] == list(range(1, expected + 1))
    assert (run / "iter-01" / "samples.jsonl").read_bytes() == (full / "iter-01" / "samples.jsonl").read_bytes()
    assert (run / "adapters.safetensors").read_bytes() == (full / "adapters.safetensors").read_bytes()
    assert not (run / "iter-01" / sampling.PARTIAL).exists()  # samples.jsonl holds them all now


def test_a_stop_mid_sampling_is_a_resumable_stop_and_resume_samples_only_the_rest(
    tiny_config, greedy_model, uninterrupted, tmp_path, monkeypatch
):
    cfg = tiny_config(SLOW_SAMPLING, model=greedy_model, queries=QUERY_LINES, out=tmp_path / "run")
    groups: list[ev.GroupSampled] = []
    result = train(
        cfg,
        callbacks=[lambda e: groups.append(e) if isinstance(e, ev.GroupSampled) else None],
        should_stop=lambda: len(groups) >= 3,
    )
    assert result.stopped_early and result.reason == "cancelled"
    run = Path(cfg.out)
    state = json.loads((run / "state.json").read_text())  # written although no step ever saved one
    assert not state["finished"] and state["phase"] == "sampling" and state["global_step"] == 0
    assert len(groups) == 3 and len(partial_rows(run)) == 3  # polled between decode steps: no group after it
    assert [r["responses"] for r in partial_rows(run)] == [g.responses for g in groups]
    last = [r for r in read_jsonl(run / "metrics.jsonl")][-1]
    assert last["event"] == "RunCompleted" and last["reason"] == "cancelled"
    assert not any(r["event"] == "GroupSampled" for r in read_jsonl(run / "metrics.jsonl"))  # not logged
    assert_resumes_to_the_uninterrupted_run(run, uninterrupted, monkeypatch)


def test_at_temperature_one_a_resume_keeps_the_finished_groups_exactly(tiny_config, tmp_path):
    """Sampled groups come back as they were; the unfinished ones are sampled afresh, from the iteration's
    seed, so they differ from what a run never stopped would have drawn (see the report's user doc)."""
    cfg = tiny_config(queries_per_step=8, queries=QUERY_LINES, gen_batch_size=2, out=tmp_path / "run")
    seen: list[ev.Event] = []
    train(cfg, callbacks=[seen.append], should_stop=lambda: sum(isinstance(e, ev.GroupSampled) for e in seen) >= 2)
    run = Path(cfg.out)
    saved = partial_rows(run)
    assert len(saved) == 2
    resume(run)
    final = read_jsonl(run / "iter-01" / "samples.jsonl")
    keys = ("query", "variants", "responses", "tokens", "finish")
    assert [{k: r[k] for k in keys} for r in final[:2]] == [{k: r[k] for k in keys} for r in saved]
    assert len(final) >= 8


def test_sigint_mid_sampling_loses_no_finished_group(tiny_flags, greedy_model, uninterrupted, tmp_path, monkeypatch):
    run = tmp_path / "run"
    flags = tiny_flags(SLOW_SAMPLING, model=greedy_model, queries=QUERY_LINES, out=run)
    # A Ctrl-C at the 40th decode step of the iteration's sampling (each group is one batch of about 17
    # steps here), delivered by the process itself so that a loaded machine cannot make it late.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SAMI_MLX_KILL_AT": "sampling:40:INT"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sami_mlx.train", *flags],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C's default action: a test suite started in the background inherits SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "resume with --resume" in err
    assert 2 <= len(partial_rows(run)) < 12  # finished groups are on disk, the iteration's 12 are not all done
    assert_resumes_to_the_uninterrupted_run(run, uninterrupted, monkeypatch)


def test_group_sampled_folds_into_live_samples():
    view = RunView()
    view.apply({"event": "IterationStarted", "iteration": 2, "steps": 1, "queries": 2})
    for n, q in enumerate(["a?", "b?"], start=1):
        view.apply(ev.GroupSampled(2, q, ["++", "+-"], [f"{q} yes", f"{q} no"], ["eos", "length"], n, 2).to_dict())
    assert [g["query"] for g in view.examples[2]] == ["a?", "b?"]
    assert view.examples[2][1]["responses"] == ["b? yes", "b? no"] and view.sampling is not None
    view.apply({"event": "SamplesReady", "iteration": 2, "groups": 2, "examples": []})
    assert view.sampling is None


class SlowSampling:
    """The real engine, its sampling held after the first finished group until the test presses stop."""

    def __init__(self):
        self.first_group = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.sampled = 0

    def train(self, cfg, callbacks=(), should_stop=None):
        def watch(event):
            if isinstance(event, ev.GroupSampled):
                self.sampled += 1
                if self.sampled == 1:
                    self.loop.call_soon_threadsafe(self.first_group.set)
                    time.sleep(0.5)  # the test presses stop meanwhile

        return trainer.train(cfg, [*callbacks, watch], should_stop)

    resume = staticmethod(trainer.resume)


async def test_the_tui_stops_a_run_mid_sampling_within_seconds(tiny_config, greedy_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # A sampling of minutes: 32 groups of 200 tokens each, decoded one group at a time.
    cfg = tiny_config(
        SLOW_SAMPLING, model=greedy_model, queries=QUERY_LINES, steps=4, queries_per_step=8, max_tokens=200
    )
    engine = SlowSampling()
    app = SamiApp(config=cfg.to_dict(), trainer=engine)
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.press("f2")
        run = app.screen
        assert isinstance(run, RunScreen)
        await pilot.press("ctrl+r")
        await asyncio.wait_for(engine.first_group.wait(), 60)
        assert run.running and run.view.sampling is not None
        await pilot.pause(0.2)  # the sampling is held for 0.5 s after its first group
        assert run.running and "Q: " in str(run.query_one("#samples").content)  # shown while sampling
        pressed = time.monotonic()
        await pilot.press("ctrl+t")
        await app.workers.wait_for_complete()
        idle = time.monotonic() - pressed
        await pilot.pause()
        assert idle <= 5.0, f"stopping took {idle:.1f} s"
        assert run.view.status == "stopped" and not run.running
        assert run.check_action("resume", ()) is True
        out = Path(cfg.out)
        assert json.loads((out / "state.json").read_text())["phase"] == "sampling"
        assert 1 <= len(partial_rows(out)) < 32
        assert "Q: " in str(run.query_one("#samples").content)  # the groups sampled so far are shown

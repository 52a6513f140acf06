import json
import math
import random
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from sami_mlx.cli.train import main
from sami_mlx.fileio import read_jsonl
from sami_mlx.inputs.constitution import Variant
from sami_mlx.inputs.prompts import encode_prompt, load_template
from sami_mlx.loop.loss import kl_on
from sami_mlx.loop.rollout import Generation, Group
from sami_mlx.loop.scoring import ScoringBatch
from sami_mlx.loop.train_step import train_step
from sami_mlx.loop.trainer import train

PROMPT = "System: follow the principles.\nHuman: How do I bake bread?\nAssistant:"


# Two iterations of one step, eight tokens a response.
TRAINED = dict(iterations=2, max_tokens=8, learning_rate=1e-3, seed=3)


def random_groups(seed: int, lengths=(6, 6, 6)) -> list[Group]:
    """A group per length, of two random responses that long under the paper's two variants."""
    rng = np.random.default_rng(seed)
    return [
        Group(
            q,
            f"query {q}",
            [Variant((True, True)), Variant((False, True))],
            [Generation([int(t) for t in rng.integers(5, 300, n)], "", "length") for _ in range(2)],
        )
        for q, n in enumerate(lengths)
    ]


def logits_of(model, tokenizer, text=PROMPT):
    return np.array(model(mx.array([tokenizer.encode(text)])))


def test_fixed_batch_is_driven_toward_zero_loss(tiny_loop, tmp_path):
    loop = tiny_loop(
        learning_rate=1e-3, lora_rank=8, lora_layers=-1, kl_beta=0.0, anchor_beta=0.0, variants="paper", out=tmp_path
    )
    model = loop.model
    groups = random_groups(0)
    model.train()
    losses = [train_step(loop.step_parts, groups, random.Random(k)).loss for k in range(25)]
    assert losses[0] > 0.3  # the random base model barely tells the variants apart
    assert losses[-1] < 0.02
    last = train_step(loop.step_parts, groups, random.Random(99))
    assert last.row_accuracy == 1.0 and last.column_accuracy == 1.0
    assert last.mi_bound == pytest.approx(math.log(2), abs=0.02)


def test_anchor_holds_the_unprompted_behaviour_while_sami_trains(tiny_loop, tmp_path):
    """--anchor-beta keeps the model near the base after prompts with no constitution; SAMI still learns."""
    groups = random_groups(1)

    def trained(anchor_beta: float):
        loop = tiny_loop(
            learning_rate=1e-3,
            lora_rank=8,
            lora_layers=-1,
            anchor_beta=anchor_beta,
            kl_beta=0.0,
            out=tmp_path / f"anchor-{anchor_beta}",
        )
        model, tokenizer = loop.model, loop.tokenizer
        model.train()
        steps = [train_step(loop.step_parts, groups, random.Random(k)) for k in range(20)]
        # The responses after the dialogue template with an empty constitution, as the anchor sees them.
        plain = [encode_prompt(tokenizer, load_template("dialogue").fill("", g.query), False) for g in groups]
        batch = loop.step_parts.scoring_batch(groups, random.Random(0))
        drift = kl_on(model, ScoringBatch(batch.prompts, batch.responses, plain).anchored()).item()
        return steps, drift

    free, free_drift = trained(0.0)
    anchored, anchored_drift = trained(1.0)
    assert all(s.anchor_kl == 0.0 for s in free)  # not computed without --anchor-beta
    assert anchored[0].anchor_kl == pytest.approx(0.0, abs=1e-6)  # adapters start as the identity
    assert anchored[-1].anchor_kl > 0
    assert anchored_drift < 0.75 * free_drift, (anchored_drift, free_drift)  # measured 0.53-0.62 vs 1.19-1.27
    # The anchor constrains only the unprompted distribution: the SAMI loss still falls. Single steps
    # are noisy (and their path differs between BLAS libraries), so compare the first and last four.
    first, last = (sum(s.loss for s in part) / 4 for part in (anchored[:4], anchored[-4:]))
    print("loss", first, last)
    assert last < 0.7 * first, (first, last)


def test_micro_batches_add_up_to_one_batch_with_both_kl_terms(tiny_loop, tmp_path):
    """--grad-accumulation (and ranks, which split groups the same way) must not change the step, even
    when groups hold responses of different lengths: the KL terms average over the whole step's tokens."""
    groups = random_groups(2, lengths=(2, 9, 4))

    def steps(ga: int):
        loop = tiny_loop(
            learning_rate=3e-3,
            lora_rank=8,
            lora_layers=-1,
            kl_beta=0.5,
            anchor_beta=0.5,
            queries_per_step=3,
            grad_accumulation=ga,
            out=tmp_path / f"ga-{ga}",
        )
        loop.model.train()
        return [train_step(loop.step_parts, groups, random.Random(k)) for k in range(3)]

    one, three = steps(1), steps(3)
    assert one[-1].kl > 1e-4 and one[-1].anchor_kl > 1e-4  # the adapters moved: both terms count
    for a, b in zip(one, three):
        for key in ("loss", "kl", "anchor_kl", "grad_norm"):
            assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-4, abs=1e-6), key


def test_cli_run_reloads_in_mlx_lm_with_identical_outputs(tiny_model, tiny_config, tiny_flags, tmp_path):
    cli_run = tmp_path / "cli"
    assert main(tiny_flags(TRAINED, out=cli_run)) == 0

    for name in ["config.yaml", "metrics.jsonl", "state.json", "adapters.safetensors", "adapter_config.json"]:
        assert (cli_run / name).is_file(), name
    for it in ("iter-01", "iter-02"):
        for name in ["samples.jsonl", "adapters.safetensors", "adapter_config.json"]:
            assert (cli_run / it / name).is_file(), f"{it}/{name}"
    state = json.loads((cli_run / "state.json").read_text())
    assert state["completed_iterations"] == 2 and state["finished"]

    # The same config through the Python API gives the same adapters, and its in-memory model
    # is what mlx_lm.load rebuilds from the CLI's run directory.
    result = train(tiny_config(TRAINED, out=tmp_path / "api"))
    a = mx.load(str(cli_run / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "api" / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)

    reloaded, tokenizer = mlx_lm.load(str(tiny_model), adapter_path=str(cli_run))
    base, _ = mlx_lm.load(str(tiny_model))
    got, want = logits_of(reloaded, tokenizer), logits_of(result.model, result.tokenizer)
    assert np.abs(got - want).max() < 1e-5
    assert np.abs(got - logits_of(base, tokenizer)).max() > 1e-4  # training changed the model
    # RUN/adapters.safetensors is the iteration the run kept (by default the best held-out MI bound).
    kept = state["kept"]
    best = max(state["iterations"], key=lambda s: s["heldout_mi"])
    assert kept["rule"] == "best" and kept["iteration"] == best["iteration"]
    a_kept = mx.load(str(cli_run / kept["adapters"] / "adapters.safetensors"))
    assert all(mx.array_equal(a[k], a_kept[k]).item() for k in a)


def test_events_in_metrics_log(tiny_config, tmp_path):
    out = tmp_path / "run"
    seen = []
    train(tiny_config(iterations=3, variants="grid", out=out), callbacks=[seen.append])
    rows = read_jsonl(out / "metrics.jsonl")
    names = [r["event"] for r in rows]
    assert names[0] == "RunStarted" and names[-1] == "RunCompleted"
    steps = [r for r in rows if r["event"] == "StepCompleted"]
    # Paper schedule: steps grow s, 2s, 3s.
    assert [sum(r["iteration"] == it for r in steps) for it in (1, 2, 3)] == [1, 2, 3]
    assert [r["global_step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    first = steps[0]
    assert len(first["scores"]) == 4 and len(first["scores"][0]) == 4  # grid over 2 principles
    assert first["mi_bound"] == pytest.approx(math.log(4) - first["loss"], abs=1e-6)
    ready = [r for r in rows if r["event"] == "SamplesReady"]
    assert all(r["groups"] + r["dropped_empty"] + r["dropped_identical"] + r["dropped_banned"] > 0 for r in ready)
    # The callback saw the same stream, plus sampling progress and live groups that the log leaves out.
    progress = ("SamplingProgress", "StageProgress", "GroupSampled")
    assert [type(e).__name__ for e in seen if type(e).__name__ not in progress] == names
    ready_groups = sum(r["queries_sampled"] for r in ready)
    assert sum(type(e).__name__ == "GroupSampled" for e in seen) == ready_groups  # one per sampled group

    # Alternating disjoint query splits: iterations 1 and 2 never share a query; 3 reuses 1's split.
    def queries_of(it):
        return {r["query_index"] for r in read_jsonl(out / f"iter-0{it}" / "samples.jsonl")}

    assert queries_of(1).isdisjoint(queries_of(2))
    assert not queries_of(3) & queries_of(2)


def test_continue_schedule_keeps_steps_constant(tiny_flags, tmp_path):
    out = tmp_path / "run"
    assert main(tiny_flags(TRAINED, schedule="continue", iterations=3, steps=2, out=out)) == 0
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "StepCompleted"]
    assert [r["steps"] for r in steps] == [2] * 6


def test_kl_to_base_is_logged_and_grows_from_zero(tiny_flags, tmp_path):
    out = tmp_path / "run"
    assert main(tiny_flags(TRAINED, kl_beta=0.5, iterations=1, steps=3, learning_rate=5e-3, out=out)) == 0
    kls = [r["kl"] for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "StepCompleted"]
    assert kls[0] == pytest.approx(0.0, abs=1e-6)  # adapters start as the identity
    assert kls[-1] > 1e-6


def test_fuse_works_on_a_run(tiny_model, tiny_flags, tmp_path):
    out = tmp_path / "run"
    assert main(tiny_flags(TRAINED, iterations=1, out=out)) == 0
    fused = tmp_path / "fused"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "fuse",
            "--model",
            str(tiny_model),
            "--adapter-path",
            str(out),
            "--save-path",
            str(fused),
        ],
        check=True,
        capture_output=True,
    )
    adapted, tokenizer = mlx_lm.load(str(tiny_model), adapter_path=str(out))
    fused_model, _ = mlx_lm.load(str(fused))
    assert np.abs(logits_of(adapted, tokenizer) - logits_of(fused_model, tokenizer)).max() < 1e-4


def test_qlora_on_a_quantized_model(tiny_model, tiny_flags, tmp_path):
    from mlx_lm import convert

    qdir = tmp_path / "tiny-4bit"
    convert(str(tiny_model), mlx_path=str(qdir), quantize=True, q_group_size=32, q_bits=4)
    assert json.loads((qdir / "config.json").read_text())["quantization"]["bits"] == 4
    out = tmp_path / "run"
    # --dequantize no: on the CPU `auto` would train this small model dequantized (tests/test_dequantize.py)
    flags = tiny_flags(TRAINED, model=qdir, iterations=1, learning_rate=5e-3, steps=2, out=out, dequantize="no")
    assert main(flags) == 0
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "StepCompleted"]
    assert all(math.isfinite(r["loss"]) for r in steps)
    adapted, tokenizer = mlx_lm.load(str(qdir), adapter_path=str(out))
    base, _ = mlx_lm.load(str(qdir))
    assert np.abs(logits_of(adapted, tokenizer) - logits_of(base, tokenizer)).max() > 1e-4


@pytest.mark.parametrize(
    "flags",
    [
        ["--dora"],
        ["--grad-checkpoint", "--optimizer", "rmsprop", "--grad-accumulation", "2"],
        ["--chat-template", "--count-eos", "--variants", "3"],
    ],
)
def test_training_options_run_and_reload(tiny_model, tiny_flags, tmp_path, flags):
    out = tmp_path / "run"
    assert main([*tiny_flags(TRAINED, iterations=1, out=out), *flags]) == 0
    adapted, tokenizer = mlx_lm.load(str(tiny_model), adapter_path=str(out))
    assert np.isfinite(logits_of(adapted, tokenizer)).all()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == ("dora" if "--dora" in flags else "lora")


def test_same_seed_same_adapters_different_seed_different(tiny_flags, tmp_path):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert main(tiny_flags(TRAINED, iterations=1, seed=seed, out=tmp_path / name)) == 0
        runs[name] = mx.load(str(tmp_path / name / "adapters.safetensors"))
    assert all(mx.array_equal(runs["a"][k], runs["b"][k]).item() for k in runs["a"])
    assert not all(mx.array_equal(runs["a"][k], runs["c"][k]).item() for k in runs["a"])


def test_run_dir_with_a_run_is_refused(tiny_flags, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_flags(TRAINED, iterations=1, out=out)) == 0
    before = {p: p.read_bytes() for p in Path(out).rglob("*") if p.is_file()}
    assert main(tiny_flags(TRAINED, iterations=1, out=out)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert before == {p: p.read_bytes() for p in Path(out).rglob("*") if p.is_file()}

"""Win-rate evaluation: statistics on hand-made data, A/B randomisation, the verdict parser, and
`sami-mlx eval` end to end on a tiny run with a tiny local judge."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import pytest

from sami_mlx.checkpoints import Checkpoint, load_checkpoint_model
from sami_mlx.config import TrainConfig
from sami_mlx.errors import SamiError
from sami_mlx.evaluation.comparisons import Outcome, judge_tasks, outcome
from sami_mlx.evaluation.evaluate import intrinsic_metric
from sami_mlx.evaluation.judge import DEFAULT_JUDGE_TEMPLATE, JudgeReply, JudgeTemplate, load_judge_template
from sami_mlx.evaluation.run_setup import EvalSettings, ModelOutputs, RunSetup, load_run_setup
from sami_mlx.evaluation.verdicts import parse_verdict
from sami_mlx.evaluation.win_rates import length_controlled_win_rate, summarize, wilson_interval
from sami_mlx.inputs.constitution import Constitution, Principle, Variant
from sami_mlx.inputs.prompts import encode_prompt, load_template
from sami_mlx.loop.rollout import Generation
from sami_mlx.loop.scoring import ScoringBatch, score_naive
from sami_mlx.objective import sami_loss

# ---- statistics on hand-made data -------------------------------------------------------------


def test_length_controlled_win_rate_averages_the_two_strata():
    # checkpoint longer in 4 pairs (wins 3 of them), shorter in 2 (wins none), equal in 1.
    scores = [1, 1, 1, 0, 0, 0, 0.5]
    mine = [10, 12, 9, 20, 3, 4, 7]
    base = [5, 5, 5, 5, 8, 8, 7]
    lc, strata = length_controlled_win_rate(scores, mine, base)
    assert strata["longer"] == {"n": 4, "win_rate": 0.75}
    assert strata["shorter"] == {"n": 2, "win_rate": 0.0}
    assert strata["equal"] == {"n": 1, "win_rate": 0.5}
    assert lc == pytest.approx(0.375)  # (0.75 + 0.0) / 2, where the plain win rate is 3.5/7 = 0.5
    # Only one direction: length cannot be controlled for.
    assert length_controlled_win_rate([1, 0], [9, 9], [1, 1])[0] is None
    # All equal lengths: nothing to control, the plain win rate.
    assert length_controlled_win_rate([1, 0, 1, 1], [3] * 4, [3] * 4)[0] == pytest.approx(0.75)


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0.5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = wilson_interval(1.0, 5)
    assert lo == pytest.approx(0.5655, abs=1e-4) and hi == 1.0
    assert wilson_interval(None, 0) is None


def test_summary_counts_unparsable_as_half_and_leaves_out_errors():
    outcomes = [
        Outcome(0, "A", "A", 1.0),
        Outcome(1, "B", "A", 0.0),
        Outcome(2, "A", None, 0.5),
        Outcome(3, "B", "B", 1.0),
        Outcome(4, "A", None, None, error="HTTP 502"),
    ]
    s = summarize(outcomes, checkpoint_lengths=[5, 5, 5, 1, 5], base_lengths=[1, 1, 1, 5, 1])
    assert s["n"] == 4 and s["wins"] == 2 and s["losses"] == 1 and s["unparsable"] == 1 and s["judge_errors"] == 1
    assert s["win_rate"] == pytest.approx(2.5 / 4)
    lo, hi = s["win_rate_ci"]
    assert lo < 2.5 / 4 < hi
    assert s["length_controlled_win_rate"] == pytest.approx(0.5 * (1.5 / 3 + 1.0))
    assert s["position_a_rate"] == pytest.approx(2 / 3)


# ---- verdicts and the judge prompt -------------------------------------------------------------


@pytest.mark.parametrize(
    "text, verdict",
    [
        ("Response B is more concise.\nB", "B"),
        ("A", "A"),
        ("Reasoning...\n\n**A**", "A"),
        ("Final answer: B.", "B"),
        ("The better response is (A)", "A"),
        ("Verdict: Response A", "A"),
        ("<think>A is long, B is short. Answer: A</think>\nAnswer: B", "B"),
        ("A good response should be brief.", None),
        ("My answer: a short one is better", None),
        ("The answer is A.\nThanks for asking", "A"),
        ("[[B]]", "B"),
        ("Both are equally good.", None),
        ("", None),
    ],
)
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_judge_template_fills_in_one_pass(tmp_path):
    t = JudgeTemplate(DEFAULT_JUDGE_TEMPLATE)
    text = t.fill("1. Be kind.", "What is {response_b}?", "I say {query}", "B says hi")
    assert "What is {response_b}?" in text and "I say {query}" in text and "B says hi" in text
    assert text.rstrip().endswith("A or B.")
    bad = tmp_path / "judge.txt"
    bad.write_text("Compare {response_a} with the other one.")
    with pytest.raises(SamiError, match=r"judge.txt: judge template has no \{response_b\}"):
        load_judge_template(str(bad))
    typo = tmp_path / "typo.txt"
    typo.write_text("Compare {response_a} with {response_b} under {constitution}.")
    with pytest.raises(SamiError, match=r"typo.txt: judge template has an unknown placeholder \{constitution\}"):
        load_judge_template(str(typo))
    good = tmp_path / "good.txt"
    good.write_text("P={principles} Q={query} A={response_a} B={response_b}")
    assert load_judge_template(str(good)).fill("p", "q", "a", "b") == "P=p Q=q A=a B=b"


# ---- A/B order randomisation ----------------------------------------------------------------------


def fake_setup() -> RunSetup:
    c = Constitution("test", (Principle("brief", "Be brief.", "Be long."), Principle("kind", "Be kind.", "Be rude.")))
    cfg = TrainConfig(model="m", constitution="c.yaml")
    return RunSetup(Path("."), cfg, c, load_template("dialogue"), load_template("dialogue"))


def fake_outputs(n: int) -> tuple[ModelOutputs, ModelOutputs]:
    base = ModelOutputs("base", [Generation([1, 2], f"base answer {i}", "eos") for i in range(n)])
    mine = ModelOutputs("iter-01", [Generation([1, 2, 3], f"CKPT answer {i}", "eos") for i in range(n)])
    return base, mine


def judge_replies(tasks, pick) -> list[JudgeReply]:
    return [JudgeReply(pick(t.prompt)) for t in tasks]


def test_positions_are_randomised_with_the_seed():
    setup, template = fake_setup(), JudgeTemplate(DEFAULT_JUDGE_TEMPLATE)
    base, mine = fake_outputs(40)
    settings = EvalSettings(queries=[f"q{i}" for i in range(40)], seed=3, per_principle=True)
    tasks = judge_tasks(setup, settings, base, mine, template)
    assert len(tasks) == 40 * 3  # all principles, then each principle alone
    positions = [t.checkpoint_position for t in tasks[:40]]
    assert 10 < positions.count("A") < 30
    for t in tasks:
        a = t.prompt.split("Response A:")[1].split("Response B:")[0]
        assert ("CKPT" in a) == (t.checkpoint_position == "A")
    again = judge_tasks(setup, settings, base, mine, template)
    assert [t.checkpoint_position for t in again] == [t.checkpoint_position for t in tasks]
    other = judge_tasks(setup, EvalSettings(queries=settings.queries, seed=4), base, mine, template)
    assert [t.checkpoint_position for t in other] != positions
    assert "1. Be kind." in tasks[-1].prompt and "Be brief." not in tasks[-1].prompt

    # A judge that reads the content finds the checkpoint wherever it stands ...
    by_content = [
        outcome(t, r)
        for t, r in zip(
            tasks[:40],
            judge_replies(
                tasks[:40], lambda p: "A" if "CKPT" in p.split("Response A:")[1].split("Response B:")[0] else "B"
            ),
        )
    ]
    assert summarize(by_content, [3] * 40, [2] * 40)["win_rate"] == 1.0
    # ... and a judge that always says "A" wins exactly where the checkpoint was drawn into A.
    always_a = [outcome(t, r) for t, r in zip(tasks[:40], judge_replies(tasks[:40], lambda p: "A"))]
    s = summarize(always_a, [3] * 40, [2] * 40)
    assert s["win_rate"] == pytest.approx(positions.count("A") / 40) and s["position_a_rate"] == 1.0


# ---- on a tiny run -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(trained_run) -> Path:
    root = trained_run(iterations=2)
    (root / "held.txt").write_text("Name a colour.\nHow are you?\nGive me a tip for sleeping well.\nHello there!\n")
    return root


def test_eval_with_a_tiny_local_judge(tiny_run, tiny_model, eval_cli, capsys):
    run = tiny_run / "run"
    code = eval_cli(
        run,
        tiny_run / "held.txt",
        iterations="all",
        judge=tiny_model,
        judge_max_tokens=4,
        max_tokens=6,
        per_principle=True,
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "held-out" in err and "1 of the 4 evaluation queries" in err  # 'Hello there!' was trained on
    kept = json.loads((run / "state.json").read_text())["kept"]
    assert f"adapters.safetensors (what mlx_lm.load(adapter_path=RUN) loads) holds {kept['name']} (" in err
    for name in ("iter-01", "iter-02"):
        r = json.loads((run / "eval" / f"{name}.json").read_text())
        for key in ("win_rate", "win_rate_ci", "length_controlled_win_rate", "n", "unparsable"):
            assert key in r
        assert r["n"] == 4 and r["judge_errors"] == 0
        assert r["win_rate"] == pytest.approx((r["wins"] + 0.5 * r["unparsable"]) / 4)
        assert set(r["per_principle"]) == {"brief", "kind"} and r["per_principle"]["kind"]["n"] == 4
        for side in ("base", "checkpoint"):
            mi = r["intrinsic"][side]
            # Greedy, the tiny models never answer with nothing: all 4 groups are scored.
            assert mi["num_variants"] == 2 and mi["groups"] == 4 and mi["skipped_empty"] == 0
            assert mi["mi_bound"] == pytest.approx(math.log(2) - mi["loss"]) and mi["mi_bound"] <= math.log(2) + 1e-6
            assert 0 <= mi["row_accuracy"] <= 1 and 0 <= mi["column_accuracy"] <= 1
        # The base model answers both constitutions alike (it repeats one token): no information, a
        # bound of 0; the trained checkpoint's answers tell them apart (measured 0.29 and 0.33).
        base, trained = r["intrinsic"]["base"], r["intrinsic"]["checkpoint"]
        assert base["identical"] == 4 and base["mi_bound"] == pytest.approx(0.0, abs=1e-4)
        assert trained["identical"] < 4 and trained["mi_bound"] > 0.1
        assert len(r["items"]) == 4 and r["judge"]["kind"] == "local"
        assert {"query", "base", "checkpoint", "checkpoint_position", "verdict", "judge_output"} <= set(r["items"][0])
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert [s["checkpoint"] for s in summary] == ["iter-01", "iter-02"]
    md = (run / "eval" / "summary.md").read_text()
    assert md.startswith("| checkpoint | n | win rate | 95% CI") and "| iter-02 | 4 |" in md
    assert "Per principle, iter-01:" in md and "| kind | 4 |" in md
    assert out == md


def test_intrinsic_metric_is_the_training_objective(tiny_run):
    setup = load_run_setup(tiny_run / "run")
    model, tokenizer = load_checkpoint_model(setup.config.model, Checkpoint("iter-01", tiny_run / "run" / "iter-01"))
    variants = [Variant((True, True)), Variant((False, True))]
    groups = [
        (q, variants, [Generation(list(range(20 + i, 25 + i + j)), "", "length") for j in range(2)])
        for i, q in enumerate(["How are you?", "Name a colour.", "Tell me a joke."])
    ]
    groups.append(("Empty?", variants, [Generation([], "", "eos"), Generation([7], "", "eos")]))
    got = intrinsic_metric(model, tokenizer, setup, groups, seed=0)
    assert got["groups"] == 3 and got["skipped_empty"] == 1 and got["num_variants"] == 2
    # The same numbers by hand: naive N x N scoring in file order (shuffling is on, so take the
    # order the metric drew by turning shuffling off for both).
    setup.config.shuffle_principles = False
    got = intrinsic_metric(model, tokenizer, setup, groups, seed=0)
    c = setup.constitution
    prompts = [
        [encode_prompt(tokenizer, setup.training_template.fill(c.render(v), q), False) for v in vs]
        for q, vs, _ in groups[:3]
    ]
    S = score_naive(model, ScoringBatch(prompts, [[g.tokens for g in gens] for _, _, gens in groups[:3]]))
    loss = sami_loss(S).item()
    assert got["loss"] == pytest.approx(loss, abs=1e-4)
    assert got["mi_bound"] == pytest.approx(math.log(2) - loss, abs=1e-4)
    mx.clear_cache()


@pytest.mark.parametrize(
    "flags, names",
    [
        (["--iterations", "7"], ("--iteration 7", "iter-01")),
        (["--iterations", "base"], ("--iterations base",)),
        ([], ("no judge",)),
        (["--judge", "./no/such/judge"], ("--judge ./no/such/judge", "not found")),
        (["--judge", "x/y", "--judge-url", "http://127.0.0.1:9/v1"], ("both given",)),
        (
            ["--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m", "--judge-template", "{tmp}/nope.txt"],
            ("nope.txt", "not found"),
        ),
        (["--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m", "--limit", "0"], ("--limit 0",)),
        # The reference's own placeholder names are a typical slip when pasting its judge prompt.
        (
            ["--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m", "--judge-template", "{tmp}/paper.txt"],
            ("paper.txt", "unknown placeholder {post}", "{response_a}", "{{"),
        ),
    ],
)
def test_eval_user_errors_are_one_line(tiny_run, tmp_path, eval_cli, capsys, flags, names):
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    (tmp_path / "paper.txt").write_text(
        "For the Reddit post {post}, is {summary_a} or {response_b} better? {response_a}"
    )
    code = eval_cli(tiny_run / "run", tiny_run / "held.txt", *flags)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    for n in names:
        assert n in err


def test_eval_refuses_a_directory_that_is_not_a_run(tmp_path, eval_cli, capsys):
    code = eval_cli(tmp_path, "dialogue", judge="x/y")
    err = capsys.readouterr().err
    assert code == 2 and "config.yaml" in err

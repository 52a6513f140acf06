"""Which adapters a run keeps (choose_kept, kept_record, describe_kept) and the monitor's verdict
(find_problem, Check): pure functions of the iterations' summaries and the measured drift."""

import math

from sami_mlx.loop.kept import choose_kept, describe_kept, kept_record
from sami_mlx.loop.monitor import Check, find_problem


def summary(iteration, mi=None, healthy=True, step=4, **extra):
    return {"iteration": iteration, "step": step, "adapters": f"iter-{iteration:02d}", "heldout_mi": mi,
            "healthy": healthy, **extra}  # fmt: skip


def test_best_keeps_the_highest_held_out_mi_among_the_healthy():
    its = [summary(1, 0.2), summary(2, 0.5), summary(3, 0.9, healthy=False), summary(4, 0.1)]
    assert choose_kept(its, "best")["iteration"] == 2  # iteration 3 scored higher but was unhealthy
    assert choose_kept(its, "last")["iteration"] == 4


def test_a_tie_keeps_the_later_and_no_mi_keeps_the_last():
    assert choose_kept([summary(1, 0.3), summary(2, 0.3)], "best")["iteration"] == 2
    assert choose_kept([summary(1), summary(2)], "best")["iteration"] == 2
    # An iteration measured without the monitor never beats one with a figure.
    assert choose_kept([summary(1, -0.5), summary(2)], "best")["iteration"] == 1


def test_no_healthy_iteration_keeps_the_base_model():
    assert choose_kept([summary(1, healthy=False)], "best") is None
    assert choose_kept([], "last") is None
    kept = kept_record(None, "best")
    assert kept == {"name": "base", "rule": "best"}
    assert describe_kept(kept) == "no iteration was healthy: the base model"


def test_kept_record_names_a_healthy_step_inside_an_iteration():
    partial = summary(2, 0.4, step=3, adapters="healthy", partial=True)
    kept = kept_record(choose_kept([summary(1, 0.1), partial], "best"), "best")
    assert kept["name"] == "iter-02 step 3" and kept["adapters"] == "healthy"
    assert describe_kept(kept, " (", ")") == " (best held-out MI bound, +0.400 nats)"
    assert describe_kept(kept_record(summary(1, 0.1), "last")) == "the last healthy iteration"
    assert describe_kept(None) == ""


def test_find_problem_names_the_first_limit_passed():
    assert find_problem({"plain": 1.2, "prompted": 2.0}, 1.1, 1.5, 3.0) == ""
    plain = find_problem({"plain": 1.6, "prompted": 2.0}, None, 1.5, 3.0)
    assert "without a constitution" in plain and "1.60x" in plain and "limit 1.5x" in plain
    # The prompted drift has the looser limit; a NaN never passes.
    assert find_problem({"plain": 1.0, "prompted": 2.5}, None, 1.5, 3.0) == ""
    assert "with the constitution" in find_problem({"plain": 1.0, "prompted": math.nan}, None, 1.5, 3.0)
    assert "--heldout text perplexity reached 1.80x" in find_problem({}, 1.8, 1.5, 3.0)
    # --max-ppl-ratio off turns every guard off.
    assert find_problem({"plain": 1e6, "prompted": 1e6}, 1e6, None, 3.0) == ""


def test_a_check_records_what_it_measured_without_its_problem():
    healthy = Check(drift_prompted=1.1, drift_plain=1.0, heldout_mi=0.2, answers={"mean_length": 7.0})
    assert healthy.to_dict() == {
        "drift_prompted": 1.1, "drift_plain": 1.0, "heldout_mi": 0.2, "mean_length": 7.0, "healthy": True
    }  # fmt: skip
    sick = Check(False, "drift", heldout_ppl=30.0, ppl_ratio=2.0)
    assert sick.to_dict() == {"heldout_ppl": 30.0, "ppl_ratio": 2.0, "healthy": False}
    assert Check().to_dict() == {"healthy": True}

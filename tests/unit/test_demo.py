"""The toy principles world: the checker, the corpus, the win rate and the pretraining loss (the demo run
itself, SAMI raising adherence, is tests/integration/test_demo_run.py)."""

import random

import pytest

from sami_mlx.inputs.constitution import Variant
from sami_mlx.toy import world


def test_checker_reads_each_behaviour():
    names = ["register", "length", "numbers", "format"]
    c = world.sub_constitution(names)
    followed, broken = dict.fromkeys(names, 1.0), dict.fromkeys(names, 0.0)
    formal_short = " certainly boats indeed."
    assert world.adherence(formal_short, c, Variant((True, True, False, False))) == followed
    casual_long_list = " - hey boats 12 kinda\n- cool stuff the thing about it\n- you can find okay"
    assert world.adherence(casual_long_list, c, Variant((False, False, True, True))) == followed
    assert world.adherence(casual_long_list, c, Variant((True, True, False, False))) == broken
    # Neither formal nor casual: follows neither wording of the register principle.
    assert world.adherence(" the boats.", c, Variant((True, True, False, False)))["register"] == 0.0
    assert world.adherence(" the boats.", c, Variant((False, True, False, False)))["register"] == 0.0


def test_replies_show_the_behaviours_they_were_written_with():
    rng = random.Random(0)
    for _ in range(300):
        behaviour = {n: rng.random() < 0.5 for n in world.principle_names()}
        reply = world.write_reply(world.make_query(rng), behaviour, rng)
        assert world.behaviour_of(reply) == behaviour, reply


def test_corpus_links_wording_to_behaviour_only_weakly_with_a_prior_bias():
    spec = world.WorldSpec(p_default_if_stated=0.9, p_default_if_opposed=0.55)
    pairs = world.corpus(6000, seed=1, spec=spec)
    for p in world.WORLD.principles:
        default = world.DEFAULTS[p.name]
        for sign, wording in ((True, p.positive), (False, p.negative)):
            shown = [world.behaviour_of(r)[p.name] for prompt, r in pairs if wording in prompt]
            p_default = sum(b == default for b in shown) / len(shown)
            # The default behaviour wins whatever is stated (greedy decoding reveals nothing) ...
            assert p_default > 0.5
            # ... but stating it makes it likelier: the weak latent link.
            expected = 0.9 if sign == default else 0.55
            assert p_default == pytest.approx(expected, abs=0.04)


def test_unmarked_replies_show_no_register_and_leave_the_link_as_it_was():
    spec = world.WorldSpec(p_default_if_stated=0.9, p_default_if_opposed=0.52, p_unmarked=0.35)
    pairs = world.corpus(6000, seed=2, spec=spec)
    shown = [(prompt, world.behaviour_of(r)["register"]) for prompt, r in pairs]
    assert sum(b is None for _, b in shown) / len(shown) == pytest.approx(0.35, abs=0.03)
    # Unmarked replies follow neither wording: the checker scores them 0 for register either way.
    unmarked = next(r for _, r in pairs if world.behaviour_of(r)["register"] is None)
    c = world.sub_constitution(["register"])
    assert (
        world.adherence(unmarked, c, Variant((True,)))
        == world.adherence(unmarked, c, Variant((False,)))
        == {"register": 0.0}
    )
    # Among marked replies the stated wording tilts the odds exactly as before (casual is the default).
    for wording, p_casual in (("Speak casually.", 0.9), ("Speak formally.", 0.52)):
        marked = [b for prompt, b in shown if wording in prompt and b is not None]
        assert sum(b is False for b in marked) / len(marked) == pytest.approx(p_casual, abs=0.04)


def test_win_rate_counts_ties_half_with_the_wilson_interval_eval_uses():
    from sami_mlx import stats
    from sami_mlx.inputs.constitution import Constitution, Principle
    from sami_mlx.toy.demo import Evaluation, win_rate

    c = Constitution("c", (Principle("a", "A.", "not A."), Principle("b", "B.", "not B.")))
    base = Evaluation(c, [], [], [{"a": 0, "b": 0}, {"a": 1, "b": 0}, {"a": 1, "b": 1}, {"a": 0, "b": 1}])
    aligned = Evaluation(c, [], [], [{"a": 1, "b": 0}, {"a": 1, "b": 1}, {"a": 1, "b": 1}, {"a": 0, "b": 0}])
    rate, ci = win_rate(aligned, base)  # win, win, tie, loss
    assert rate == pytest.approx(2.5 / 4)
    assert ci == stats.wilson_interval(2.5 / 4, 4)
    lo, hi = stats.wilson_interval(0.5, 10)  # the textbook value: 0.5 of 10 -> 0.237..0.763
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert stats.wilson_interval(1.0, 5)[1] == pytest.approx(1.0) and stats.wilson_interval(1.0, 5)[0] < 0.6
    assert stats.win_rate([]) == (None, None)


def test_pretraining_loss_reads_only_the_reply_and_matches_mlx_lm():
    """The toy model's loss runs only reply positions through the output layer, and equals mlx-lm's
    `default_loss` with the reply masked in (the loss it replaced)."""
    import mlx.core as mx
    from mlx_lm.models import llama
    from mlx_lm.tuner.trainer import default_loss

    from sami_mlx.toy.pretrain import batch_arrays, reply_loss

    config = dict(model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    config |= dict(num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=50)
    config |= dict(rope_theta=10000.0, tie_word_embeddings=True)
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    rows = [(4, [1, 5, 6, 7, 8, 9, 2]), (2, [1, 5, 10, 11, 12, 13, 14, 2]), (6, [1, 3, 4, 5, 6, 7, 30, 2])]
    ids, positions, mask = batch_arrays(rows)
    assert positions.shape == (3, 6) and mask.sum().item() == 3 + 6 + 2  # each reply and its EOS
    lengths = mx.array([[start, len(ids_) - 1] for start, ids_ in rows])
    expected, _ = default_loss(model, ids, lengths)
    head, seen = model.model.embed_tokens.as_linear, []
    model.model.embed_tokens.as_linear = lambda h: (seen.append(h.shape), head(h))[1]
    assert reply_loss(model, ids, positions, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    assert seen == [(3, 6, 32)]  # 6 reply positions a row go through the output layer, not all 7


def test_pretraining_batches_group_lengths_and_cover_every_document_once_an_epoch():
    import random

    from sami_mlx.toy.pretrain import GROUP, batch_plan

    rng = random.Random(0)
    docs = [(1, [0] * rng.randint(10, 80)) for _ in range(32 * GROUP)]
    plan = batch_plan(docs, 32, GROUP, random.Random(1))
    assert sorted(i for batch in plan for i in batch) == list(range(len(docs)))  # one epoch, each once
    spread = [max(len(docs[i][1]) for i in b) - min(len(docs[i][1]) for i in b) for b in plan]
    assert max(spread) < 20  # random batches of 32 from 10..80 would spread over ~60


def test_the_demo_budget_says_why_it_chose_it(monkeypatch):
    import mlx.core as mx

    from sami_mlx.presets import load_preset
    from sami_mlx.toy.demo import demo_budget

    toy, real = load_preset("toy-world"), load_preset("smollm2-135m-instruct")
    assert "cpu_budget" not in toy["demo"] and real["demo"]["cpu_budget"]
    for device in (mx.cpu, mx.gpu):
        monkeypatch.setattr(mx, "default_device", lambda d=device: mx.Device(d))
        toy_budget, real_budget = demo_budget(toy), demo_budget(real)
        # A synthetic world trains at train's defaults everywhere, and does not claim a GPU for it.
        assert toy_budget.settings == {} and "GPU" not in toy_budget.why
        if device == mx.cpu:
            assert real_budget.name == "CPU budget" and real_budget.settings == real["demo"]["cpu_budget"]
            assert "CPU" in real_budget.why
        else:
            assert real_budget.settings == {} and "GPU" in real_budget.why

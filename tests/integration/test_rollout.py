import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.generate import generate_step

from sami_mlx.inputs.constitution import Constitution, Principle, Variant
from sami_mlx.loop.rollout import (
    Generation,
    Group,
    cut_at_stop,
    filter_groups,
    generate_batch,
    sample_stats,
)


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return mlx_lm.load(str(tiny_model))


def reference_greedy(model, tokenizer, prompt, max_tokens):
    out = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
        if token in tokenizer.eos_token_ids:
            break
        out.append(int(token))
    return out


def test_batched_greedy_equals_one_prompt_at_a_time(loaded):
    model, tok = loaded
    prompts = [tok.encode(t) for t in ["Human: hello", "The assistant gives a direct answer to", "x", "1. Be kind."]]
    gens = generate_batch(model, tok, prompts, max_tokens=12)
    for p, g in zip(prompts, gens):
        assert g.tokens == reference_greedy(model, tok, p, 12)
        assert g.text == tok.decode(g.tokens)


def test_temperature_sampling_is_seeded(loaded):
    model, tok = loaded
    prompts = [tok.encode("Human: hello")] * 4
    mx.random.seed(1)
    a = [g.tokens for g in generate_batch(model, tok, prompts, 10, temperature=1.0)]
    mx.random.seed(1)
    b = [g.tokens for g in generate_batch(model, tok, prompts, 10, temperature=1.0)]
    assert a == b
    assert len({tuple(t) for t in a}) > 1  # samples of one prompt differ at temperature 1


def test_stop_string_cuts_response_and_ends_it_early(loaded):
    model, tok = loaded
    prompt = tok.encode("Human: hello")
    free = generate_batch(model, tok, [prompt], max_tokens=24, temperature=0.0)[0]
    # Greedy, the random model repeats one token and then switches to another: that token's text is
    # the stop string, first found right after a non-empty start (its own token never holds it).
    k = next((i for i, t in enumerate(free.tokens) if t != free.tokens[0]), len(free.tokens))
    assert 1 <= k < len(free.tokens) - 1, free.tokens
    head, stop = tok.decode(free.tokens[:k]), tok.decode(free.tokens[k : k + 1])
    assert head.strip() and stop.strip() and (head + stop).index(stop) == len(head), (head, stop)
    cut = generate_batch(model, tok, [prompt], max_tokens=24, stop_strings=[stop])[0]
    assert cut.finish == "stop"  # ended by the stop string, 24 - k tokens early
    assert cut.tokens == free.tokens[:k] and cut.text == head  # everything before it, nothing of it


def test_cut_at_stop_keeps_token_ids(loaded):
    _, tok = loaded
    tokens = tok.encode("Paris is the capital.\n\nHuman: and Spain?", add_special_tokens=False)
    cut = cut_at_stop(tok, tokens, ["Human:", "###"])
    assert tok.decode(cut) == "Paris is the capital."
    assert cut == tokens[: len(cut)]  # a prefix of the sampled ids, never re-encoded
    assert cut_at_stop(tok, tokens, ["nothing like this"]) == tokens


def group(*responses):
    return Group(0, "q", [Variant((True,)), Variant((False,))], [Generation(t, txt, "eos") for t, txt in responses])


def test_filter_groups_drops_and_counts_degenerate_groups():
    groups = [
        group(([1, 2], "a b"), ([3], "c")),  # fine
        group(([], ""), ([3], "c")),  # empty
        group(([5], " "), ([3], "c")),  # whitespace only counts as empty
        group(([1, 2], "a b"), ([1, 2], "a b")),  # identical
        group(([1, 2], "visit http://x"), ([3], "c")),  # banned substring
    ]
    kept, drops = filter_groups(groups, banned=["http://"])
    assert kept == [groups[0]]
    assert (drops.empty, drops.identical, drops.banned, drops.total) == (2, 1, 1, 4)
    kept, drops = filter_groups(groups)
    assert len(kept) == 2 and drops.banned == 0


def test_filter_groups_drops_a_group_whose_response_copies_a_principle():
    constitution = Constitution(
        "c", (Principle("brief", "The assistant answers in two short sentences.", "The assistant rambles on."),)
    )
    copied = group(([1], "1. The assistant answers in two short sentences, always."), ([2], "Paris."))
    answered = group(([1], "The assistant answers in two sentences: here."), ([2], "Paris."))  # 5 words in a row
    kept, drops = filter_groups([copied, answered], echo=(constitution, 6))
    assert kept == [answered] and (drops.echoed, drops.total) == (1, 1)
    assert filter_groups([copied], echo=(constitution, 0))[1].total == 0  # --echo-words 0: off
    assert filter_groups([copied, copied], banned=["Paris"], echo=(constitution, 6))[1].banned == 2  # first filter


def test_sample_stats_report_length_truncation_and_repetition():
    groups = [Group(0, "q", [], [Generation([1, 2, 1, 2], "", "length"), Generation([7, 8], "", "eos")])]
    s = sample_stats(groups, seconds=2.0)
    assert s.mean_length == 3.0
    assert s.no_eos_rate == 0.5
    assert s.distinct_2 == pytest.approx(3 / 4)  # bigrams (1,2),(2,1),(1,2),(7,8): 3 distinct of 4


def test_stop_watch_finds_a_stop_string_split_across_tokens(loaded):
    from sami_mlx.loop.rollout import StopWatch

    _, tok = loaded
    ids = tok.encode("Sure. Human: next", add_special_tokens=False)
    watch = StopWatch(tok, ["Human:"])
    hits = [watch.add(t) for t in ids]
    first = hits.index(True)
    assert "Human:" in tok.decode(ids[: first + 1]) and "Human:" not in tok.decode(ids[:first])
    assert not any(StopWatch(tok, ["###"]).add(t) for t in ids)

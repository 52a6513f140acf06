"""The style world: a real instruct model, real questions, and principles a program can check.

`sami-mlx demo --model smollm2-135m-instruct` aligns a real chat model to three principles about the
shape of a reply (brevity, a numbered list, a closing question) and checks every reply with code
instead of a judge. The questions are the built-in `dialogue` set, split once into training and
evaluation questions so that the demo never measures a question it trained on. Prompts are what
`sami-mlx train` renders for an instruct model by default: the built-in `chat` template inside the
tokenizer's chat template.

It offers the functions the demo asks of a synthetic world (sami_mlx.toy.world), so the same
before/after report works on it; what differs is that its held-out text is the base model's own plain
answers, which only the model can write (`plain_answers`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sami_mlx.inputs.constitution import Constitution, Principle, Variant
from sami_mlx.inputs.prompts import encode_prompt, load_template
from sami_mlx.inputs.queries import builtin_queries

if TYPE_CHECKING:
    from sami_mlx.loop.distributed import Ranks

NAME = "style-world"
VERSION = 1
TEMPLATE = load_template("chat")  # what train picks for an instruct model by default
QUERY_SET = "dialogue"
EVAL_SHARE = 48  # the last 48 questions of the shuffled set are never trained on
BRIEF_WORDS = 40  # "at most two short sentences", counted generously

WORLD = Constitution(
    NAME,
    (
        Principle(
            "brief",
            "The assistant answers in at most two short sentences.",
            "The assistant answers at length, in many sentences.",
        ),
        Principle(
            "list",
            "The assistant answers with a numbered list of points.",
            "The assistant answers in plain sentences, never in a list.",
        ),
        Principle(
            "question",
            "The assistant ends its reply by asking the person a question.",
            "The assistant never asks the person any question.",
        ),
    ),
)


@dataclass(frozen=True)
class WorldSpec:
    """Nothing to configure: the world is the model's own behaviour (kept for the demo's interface)."""


def principle_names() -> list[str]:
    return [p.name for p in WORLD.principles]


def sub_constitution(names: Sequence[str]) -> Constitution:
    keep = set(names)
    return Constitution("smollm2-style", tuple(p for p in WORLD.principles if p.name in keep))


def _shuffled() -> list[str]:
    questions = builtin_queries(QUERY_SET)
    random.Random(f"{NAME}-split").shuffle(questions)
    return questions


def queries(n: int, seed: int, split: str = "train") -> list[str]:
    """`n` questions of one split, in an order drawn by `seed`; training and evaluation never share one.
    Asking for more than a split holds repeats it (each repeat in a fresh order)."""
    pool = _shuffled()
    pool = pool[:-EVAL_SHARE] if split == "train" else pool[-EVAL_SHARE:]
    rng = random.Random(f"{NAME}-{split}-{seed}")
    out: list[str] = []
    while len(out) < n:
        out += rng.sample(pool, len(pool))
    return out[:n]


def encode(tokenizer, constitution_text: str, query: str) -> list[int]:
    """A prompt as training renders it for this world's model: the chat template around `TEMPLATE`."""
    return encode_prompt(tokenizer, TEMPLATE.fill(constitution_text, query), True)


def plain_prompt(tokenizer, query: str) -> str:
    """The prompt of a plain chat turn, as text (the held-out file's `prompt`)."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": query}], tokenize=False, add_generation_prompt=True
    )


_NUMBERED = re.compile(r"(?m)^\s*(?:\*\*)?\d{1,2}[.)]\s+\S")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def parrots(reply: str, constitution: Constitution = WORLD) -> bool:
    """Whether the reply restates a principle instead of answering: six words in a row of any wording
    of any principle (train's --echo-words filter, the same test). Small models often do; such a reply
    follows no principle."""
    return constitution.echoes(reply, 6)


def behaviour_of(reply: str) -> dict[str, bool]:
    """What the reply does, per principle of the world (True: the positive wording's behaviour)."""
    text = reply.strip()
    sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n+", text) if _words(s)]
    return {
        "brief": bool(text) and len(_words(text)) <= BRIEF_WORDS and len(sentences) <= 2,
        "list": len(_NUMBERED.findall(text)) >= 2,
        "question": bool(sentences) and sentences[-1].rstrip().rstrip("\"')*").endswith("?"),
    }


def adherence(reply: str, constitution: Constitution, variant: Variant) -> dict[str, float]:
    """Per principle of `constitution`: 1.0 if the reply does what the variant's wording says. An empty
    reply or one that restates the principles follows none of them."""
    if not reply.strip() or parrots(reply):
        return {p.name: 0.0 for p in constitution.principles}
    shown = behaviour_of(reply)
    return {p.name: float(shown[p.name] == sign) for p, sign in zip(constitution.principles, variant.signs)}


SPLITS = True  # queries(n, seed, split): training and evaluation questions never meet


def plain_answers(
    model, tokenizer, n: int, seed: int, max_tokens: int, ranks: Ranks | None = None
) -> list[tuple[str, str]]:
    """The model's own greedy answers to `n` evaluation questions in a plain chat turn (no
    constitution): held-out text whose perplexity tells how far SAMI moved the model's plain manner.
    A greedy answer depends on its prompt alone, so `ranks` split the questions and share the answers."""
    from sami_mlx.loop.rollout import generate_batch

    asked = queries(n, seed, split="eval")
    prompts = [plain_prompt(tokenizer, q) for q in asked]
    mine = range(len(prompts)) if ranks is None else ranks.shard(len(prompts))
    gens = generate_batch(
        model,
        tokenizer,
        [tokenizer.encode(prompts[i], add_special_tokens=False) for i in mine],
        max_tokens,
        temperature=0.0,
    )
    texts = [g.text for g in gens]
    if ranks is not None:
        texts = ranks.gather_texts(texts, len(prompts), "writing the base model's plain answers")
    return list(zip(prompts, texts))

"""Arithmetic word problems with exact answers: a fine-tuning task a small stdlib-pretrained LM cannot do.

Problems are templated English sentences ("Tom has 12 apples and buys 7 more. How many apples does Tom
have?" -> "19"), deterministic for a seed. Three ways to hold out a test set, from easiest to hardest:

- ``holdout="question"`` (the demo's default): an i.i.d. split of the question texts. Test questions never
  occur verbatim in training, but their facts, templates, names and objects all do; accuracy measures
  whether the model learned the task as it was taught, the usual supervised-learning test. A
  few-million-parameter model learns it in a few hundred steps.
- ``holdout="wording"``: test problems use sentence templates, names and objects that never occur in
  training, over the same arithmetic facts: reading a new kind of sentence. The shipped 3.6M-parameter model
  stays near chance here even when it answers every training problem (it has too little English).
- ``holdout="fact"``: test facts (operation, a, b) never occur in training, so accuracy measures arithmetic
  generalisation; a tiny model stays near chance there too.
Prompts use the Alpaca instruction template; the loss is on the response tokens only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass
from typing import Any

from ..data.templates import ALPACA, QA, TEMPLATES
from ..evaluation.targets import exact_match as exact_match_score

ALPACA_TEMPLATE, QA_TEMPLATE = ALPACA, QA

NAMES = ("Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Leo", "Emma", "Max", "Zoe", "Omar", "Ivy")
ITEMS = ("apples", "books", "coins", "pencils", "cards", "stamps", "marbles", "shells", "stickers", "cookies")
# With holdout="wording" the last template of each operation, these names and these objects are test-only.
TEST_NAMES = ("Omar", "Ivy", "Zoe")
TEST_ITEMS = ("stickers", "cookies")

_ADD = (
    "{n} has {a} {i} and buys {b} more. How many {i} does {n} have?",
    "{n} had {a} {i}. {m} gave {n} {b} more {i}. How many {i} does {n} have now?",
    "There are {a} {i} in a box and {b} {i} on the table. How many {i} are there in total?",
)
# Short problems: the numbers and the operation in a few words (the demo's default: a few-million-parameter
# model learns these in a short fine-tune, while the longer word problems stay near chance).
_ADD_SHORT = ("What is {a} plus {b}?", "Add {a} and {b}.", "{n} has {a} {i} and gets {b} more. How many now?")
_SUB_SHORT = ("What is {a} minus {b}?", "Take {b} from {a}.", "{n} has {a} {i} and loses {b}. How many now?")
# Counting problems: one up or one down (facts with b = 1), the easiest arithmetic to learn.
_ADD_COUNT = (
    "What number comes after {a}?",
    "Count one up from {a}.",
    "{n} had {a} {i} and found one more. How many?",
)
_SUB_COUNT = (
    "What number comes before {a}?",
    "Count one down from {a}.",
    "{n} had {a} {i} and lost one. How many?",
)
_SUB = (
    "{n} has {a} {i} and gives {b} to {m}. How many {i} does {n} have left?",
    "{n} had {a} {i} and lost {b} of them. How many {i} does {n} have now?",
    "There were {a} {i} on the shelf. {n} took {b}. How many {i} are on the shelf now?",
)


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    op: str
    a: int
    b: int
    template: str = ALPACA_TEMPLATE

    @property
    def prompt(self) -> str:
        return self.template.format(instruction=self.question)


def _facts(max_value: int) -> list[tuple[str, int, int]]:
    facts = [("+", a, b) for a in range(max_value + 1) for b in range(1, max_value + 1)]
    facts += [("-", a, b) for a in range(1, max_value + 1) for b in range(1, a + 1)]
    return facts


def _is_test(fact: tuple[str, int, int] | str, seed: int, test_fraction: float) -> bool:
    h = hashlib.sha1(f"{seed}:{fact}".encode()).hexdigest()[:8]
    return int(h, 16) / 0xFFFFFFFF < test_fraction


def _render(
    fact: tuple[str, int, int], rng: random.Random, wording: str = "any", style: str = "word"
) -> Problem:
    """``wording``: "any" (every template/name/object), "train" (no test-only ones) or "test" (only those)."""
    op, a, b = fact
    if style == "short":
        templates = _ADD_SHORT if op == "+" else _SUB_SHORT
    elif style == "count":
        templates = _ADD_COUNT if op == "+" else _SUB_COUNT
    else:
        templates = _ADD if op == "+" else _SUB
    names, items = list(NAMES), list(ITEMS)
    if wording == "train":
        templates = templates[:-1]
        names = [x for x in NAMES if x not in TEST_NAMES]
        items = [x for x in ITEMS if x not in TEST_ITEMS]
    elif wording == "test":
        templates = templates[-1:]
        items = list(TEST_ITEMS)
    n = rng.choice(TEST_NAMES) if wording == "test" else rng.choice(names)
    m = rng.choice([x for x in names if x != n])
    q = rng.choice(templates).format(n=n, m=m, i=rng.choice(items), a=a, b=b)
    return Problem(q, str(a + b if op == "+" else a - b), op, a, b)


def arith_problems(
    split: str,
    n: int,
    seed: int = 0,
    max_value: int = 20,
    test_fraction: float = 0.2,
    holdout: str = "fact",
    style: str = "word",
    template: str = "alpaca",
) -> list[Problem]:
    """``n`` problems of ``split`` ("train" or "test"), held out by ``holdout`` ("question", "wording", "fact").

    Train problems are sampled with replacement from the train facts (with fresh wording); test problems
    cycle through the shuffled test facts, so a small test set covers distinct facts. With "question",
    problems are drawn from everything and sorted into the splits by a hash of the question text.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is invalid: use 'train' or 'test'.")
    if max_value < 2:
        raise ValueError(f"max_value={max_value!r} is too small: use 2 or more.")
    if style not in ("word", "short", "count"):
        raise ValueError(f"style={style!r} is invalid: use 'word', 'short' or 'count'.")
    if holdout not in ("question", "fact", "wording"):
        raise ValueError(f"holdout={holdout!r} is invalid: use 'question', 'wording' or 'fact'.")
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r} is invalid: use 'alpaca' or 'qa'.")
    all_facts = _facts(max_value)
    if style == "count":
        all_facts = [f for f in all_facts if f[2] == 1]
    if holdout == "question":
        problems = _question_split(split, n, seed, all_facts, test_fraction, style)
    else:
        problems = _fact_or_wording_split(split, n, seed, all_facts, test_fraction, holdout, style)
    return [dataclasses.replace(p, template=TEMPLATES[template]) for p in problems]


def _fact_or_wording_split(
    split: str,
    n: int,
    seed: int,
    all_facts: list[tuple[str, int, int]],
    test_fraction: float,
    holdout: str,
    style: str,
) -> list[Problem]:
    if holdout == "fact":
        facts = [f for f in all_facts if _is_test(f, seed, test_fraction) == (split == "test")]
        wording = "any"
    else:
        facts = all_facts
        wording = split
    rng = random.Random(f"{seed}:{split}:{holdout}")
    if split == "test":
        rng.shuffle(facts)
        chosen = [facts[i % len(facts)] for i in range(n)]
    else:
        chosen = [rng.choice(facts) for _ in range(n)]
    return [_render(f, rng, wording, style) for f in chosen]


def _question_split(
    split: str, n: int, seed: int, facts: list[tuple[str, int, int]], test_fraction: float, style: str
) -> list[Problem]:
    """Problems whose question text hashes into ``split``; test problems are distinct while there are enough."""
    rng = random.Random(f"{seed}:{split}:question")
    want_test = split == "test"
    out: list[Problem] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        p = _render(rng.choice(facts), rng, "any", style)
        if _is_test(p.question, seed, test_fraction) != want_test:
            continue
        # distinct test questions, unless the space is exhausted (tiny settings): then repeats are allowed
        if want_test and p.question in seen and tries < 50 * n:
            continue
        seen.add(p.question)
        out.append(p)
    return out


def encode_sft(problems: list[Problem], tokenizer: Any, max_length: int = 128) -> list[dict[str, list[int]]]:
    """Token ids and labels for supervised fine-tuning: ``<bos> prompt answer <eos>``, loss on the answer."""
    out = []
    for p in problems:
        prompt = tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        resp = tokenizer(p.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = [tokenizer.bos_token_id, *prompt, *resp][:max_length]
        labels = ([-100] * (1 + len(prompt)) + resp)[:max_length]
        out.append({"input_ids": ids, "labels": labels})
    return out


def exact_match(prediction: str, answer: str) -> bool:
    """The first whitespace-separated word of the completion, trailing dots dropped, equals the answer
    (strict: no other number): the ``first_word`` rule of :func:`disel.evaluation.targets.exact_match`, which
    the demo's accuracy and the pipeline's ``exact_match`` target score with."""
    return exact_match_score([prediction], [answer], extract="first_word") == 1.0

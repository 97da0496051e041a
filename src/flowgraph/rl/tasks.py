"""Synthetic tasks with rule-based rewards that a randomly initialised tiny GPT learns
from RL alone in minutes on a CPU.

- ``count_up``: the prompt is random digits; the answer should keep counting up by one
  (mod 10) from the prompt's last digit: after ``"3907"`` comes ``"890123..."``. The
  reward is the fraction of the first ``length`` answer characters that are the previous
  character plus one (a random model scores about 0.05).
- ``digit_fraction``: the fraction of the answer's characters that are digits.

``count_up_preferences`` makes preference pairs of the counting task for DPO (a correct
answer chosen, one that goes wrong rejected) and ``write_jsonl`` saves rows as a dataset
file.

Example::

    >>> count_up("3907", "8901")
    1.0
    >>> count_up("3907", "8x01", length=4)
    0.5
    >>> digit_fraction("12", "1a2b")
    0.5
    >>> digit_prompts(2, seed=0, digits=4)
    ['6604', '8764']
    >>> count_up_answer("3907", 4)
    '8901'
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flowgraph.rl.tokenizer import DIGITS


def count_up(prompt: str, answer: str, length: int = 0) -> float:
    """Fraction of the first ``length`` (default: ``len(answer)``, at least 1) answer
    characters that equal the previous character plus one, mod 10."""
    length = length or max(1, len(answer))
    previous, correct = prompt[-1:], 0
    for ch in answer[:length]:
        if previous in DIGITS and ch == DIGITS[(DIGITS.index(previous) + 1) % 10]:
            correct += 1
        previous = ch
    return correct / length


def digit_fraction(prompt: str, answer: str, length: int = 0) -> float:
    """Fraction of the answer's characters (or of ``length`` when given) that are digits."""
    length = length or max(1, len(answer))
    return sum(ch in DIGITS for ch in answer[:length]) / length


REWARDS: dict[str, Callable[[str, str, int], float]] = {
    "count_up": count_up,
    "digit_fraction": digit_fraction,
}


def reward_function(name: str) -> Callable[[str, str, int], float]:
    """The rule reward called ``name`` (``models.reward.args.task``)."""
    if name not in REWARDS:
        raise ValueError(f"unknown task {name!r}; rule rewards: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


def digit_prompts(count: int, seed: int, digits: int = 4) -> list[str]:
    """``count`` prompts of ``digits`` random digits, the same for the same ``seed``."""
    rng = random.Random(seed)
    return ["".join(rng.choice(DIGITS) for _ in range(digits)) for _ in range(count)]


def count_up_answer(prompt: str, length: int) -> str:
    """The ``length`` characters that score 1 on ``count_up`` after ``prompt``."""
    start = DIGITS.index(prompt[-1]) + 1
    return "".join(DIGITS[(start + i) % 10] for i in range(length))


def count_up_preferences(
    count: int, seed: int, digits: int = 4, length: int = 8, alphabet: str = DIGITS
) -> list[dict[str, str]]:
    """``count`` preference pairs of the counting task, the same for the same ``seed``:
    ``prompt`` (``digits`` random digits), ``chosen`` (its correct ``length``-character
    answer) and ``rejected``, which follows the chosen answer up to a random position,
    goes wrong there and goes on with random characters of ``alphabet`` (from position 0
    it is all random; near the end it is a near miss), so it always scores below 1.

    >>> count_up_preferences(1, seed=0)
    [{'prompt': '6604', 'chosen': '56789012', 'rejected': '56789017'}]
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt = "".join(rng.choice(DIGITS) for _ in range(digits))
        chosen = count_up_answer(prompt, length)
        wrong_at = rng.randrange(length)
        wrong = rng.choice([ch for ch in alphabet if ch != chosen[wrong_at]])
        rest = "".join(rng.choice(alphabet) for _ in range(length - wrong_at - 1))
        rows.append({"prompt": prompt, "chosen": chosen,
                     "rejected": chosen[:wrong_at] + wrong + rest})  # fmt: skip
    return rows


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write ``rows`` to ``path`` as JSON lines (a dataset file ``Engine.set_dataset``
    reads), creating its directory; returns the path. The file appears whole (written
    beside it, then renamed), so ranks writing the same rows at once never read half of
    it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with partial.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    os.replace(partial, path)
    return path

"""Synthetic tasks with rule-based rewards that a randomly initialised tiny GPT learns
from RL alone in minutes on a CPU.

- ``count_up``: the prompt is random digits; the answer should keep counting up by one
  (mod 10) from the prompt's last digit: after ``"3907"`` comes ``"890123..."``. The
  reward is the fraction of the first ``length`` answer characters that are the previous
  character plus one (a random model scores about 0.05).
- ``digit_fraction``: the fraction of the answer's characters that are digits.

Example::

    >>> count_up("3907", "8901")
    1.0
    >>> count_up("3907", "8x01", length=4)
    0.5
    >>> digit_fraction("12", "1a2b")
    0.5
    >>> digit_prompts(2, seed=0, digits=4)
    ['6604', '8764']
"""

from __future__ import annotations

import random
from collections.abc import Callable

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

"""Verifiable rewards: a math answer checker, a format reward, a code reward that runs the
answer against tests in a sandbox (``flowgraph.rl.sandbox``), and ``score_rows`` to score
many rows, in worker processes when a reward is slow.

A reward function takes one row and returns a float::

    fn(row: dict) -> float

``row`` holds the policy's ``prompt`` and ``answer`` (text) and the dataset sample's other
columns, e.g. ``solution`` for ``math_reward`` or ``tests`` for ``code_reward``. Any plain
Python function of that shape is a reward; ``reward_function`` finds one by registry name
(``"math"``, ``"format"``, ``"code"``) or as ``"package.module:function"``. A missing
column is a ``DataError``; a bad answer (garbage, code that crashes) scores 0.

    >>> extract_answer("so the total is $\\\\boxed{\\\\frac{3}{4}}$")
    '\\\\frac{3}{4}'
    >>> math_equal("0.75", "\\\\dfrac{3}{4}"), math_equal("1,000", "1000"), math_equal("7", "8")
    (True, True, False)
    >>> math_reward({"prompt": "2+2?", "answer": "2 and 2 make 4", "solution": "#### 4"})
    1.0
    >>> format_reward({"prompt": "2+2?", "answer": "<think>2+2</think> <answer>4</answer>"})
    1.0
    >>> code_reward({"prompt": "", "answer": "```python\\ndef f(x):\\n    return -x\\n```",
    ...              "tests": ["assert f(1) == -1", "assert f(0) == 1"]})
    0.5
    >>> score_rows(reward_function("math"), [{"prompt": "", "answer": "5", "solution": "6"}])
    [0.0]
"""

from __future__ import annotations

import atexit
import functools
import importlib
import inspect
import math
import multiprocessing
import numbers
import pickle
import re
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import repeat

from flowgraph.errors import ConfigError, DataError, RewardError, did_you_mean
from flowgraph.rl.math_answers import extract_answer, last_number, marked_answer, math_equal
from flowgraph.rl.sandbox import run_python

Reward = Callable[[dict], float]


def _column(row: dict, key: str, who: str):
    if not isinstance(row, dict):
        raise DataError(f"{who}: a row is a dict of columns, got {type(row).__name__}")
    if key not in row:
        raise DataError(
            f"{who}: the row has no {key!r} column (it has: {', '.join(map(str, row))}); "
            f"add {key!r} to the dataset samples, or pass key= to name the column"
        )
    return row[key]


def math_reward(row: dict, key: str = "solution") -> float:
    """1.0 if the final answer of ``row["answer"]`` equals ``row[key]``, else 0.0.

    The reference may be a bare answer (``"3/4"``, ``42``) or a full solution whose final
    answer is marked (``\\boxed``, ``####``, "the answer is"); an unmarked solution text
    also matches through its last number.

    >>> math_reward({"answer": "It is \\\\boxed{0.5}.", "solution": "\\\\frac{1}{2}"})
    1.0
    """
    reference = _column(row, key, "math_reward")
    predicted = extract_answer(_column(row, "answer", "math_reward"))
    if predicted is None or reference is None:
        return 0.0
    text = str(reference)
    marked = marked_answer(text)
    candidates = [marked] if marked is not None else [text, last_number(text)]
    return float(any(math_equal(predicted, c) for c in candidates if c is not None))


# -- format -------------------------------------------------------------------------------
FORMAT_PATTERN = r"\A\s*<think>.*?</think>\s*<answer>\s*\S.*?</answer>\s*\Z"


def format_reward(row: dict, pattern: str | re.Pattern = FORMAT_PATTERN) -> float:
    """1.0 if ``re.search(pattern, row["answer"])`` matches (a string pattern is compiled
    with ``re.DOTALL``), else 0.0. The default, ``FORMAT_PATTERN``, is the reasoning-then-
    answer format of DeepSeek-R1: ``<think>...</think>`` then a non-empty
    ``<answer>...</answer>``, nothing else around them.

    >>> format_reward({"answer": "<think>\\nhm\\n</think>\\n<answer>7</answer>"})
    1.0
    >>> format_reward({"answer": "7"}), format_reward({"answer": "7"}, pattern=r"\\d")
    (0.0, 1.0)
    """
    answer = _column(row, "answer", "format_reward")
    try:
        compiled = re.compile(pattern, re.DOTALL) if isinstance(pattern, str) else pattern
    except re.error as err:
        raise ConfigError(
            f"format_reward: pattern {pattern!r} is not a regular expression ({err})"
        ) from None
    return 1.0 if isinstance(answer, str) and compiled.search(answer) else 0.0


# -- code ---------------------------------------------------------------------------------
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_OPEN_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*)\Z", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str:
    """The code of an answer: its last ```` ```python ```` (or ``py``) block, else its last
    untagged ```` ``` ```` block, else an unclosed ```` ```python ```` block running to the
    end (an answer cut off by the length limit), else the whole text.

    >>> extract_code("Here:\\n```python\\nprint(1)\\n```\\nDone.")
    'print(1)\\n'
    """
    blocks = _FENCE.findall(text)
    for wanted in (("python", "py", "python3"), ("",)):
        chosen = [code for lang, code in blocks if lang.lower() in wanted]
        if chosen:
            return chosen[-1]
    unclosed = _OPEN_FENCE.search(text)
    return unclosed.group(1) if unclosed else text


def code_reward(row: dict, key: str = "tests", timeout: float = 5.0, memory_mb: int = 512) -> float:
    """The fraction of ``row[key]`` that the answer's code passes, run in a sandbox
    (``flowgraph.rl.sandbox.run_python``: a separate process with a wall-clock
    ``timeout``, ``memory_mb`` of address space, capped output, no network).

    ``row[key]`` is a list of tests, each Python source that raises when the code is
    wrong (typically one ``assert``; all run in the namespace the code left), or one
    string: a single test, so 1.0 or 0.0. A timeout, crash, ``MemoryError``, exit before
    the tests or output flood scores 0.0; a missing or empty test column is a
    ``DataError``.

    >>> code_reward({"answer": "def f(x): return x", "tests": "assert f(2) == 2"})
    1.0
    """
    tests = _column(row, key, "code_reward")
    if isinstance(tests, str):
        tests = [tests]
    elif isinstance(tests, list | tuple) or hasattr(tests, "tolist"):  # NumPy from Parquet
        tests = list(tests)
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise DataError(
            f"code_reward: row[{key!r}] must be a string of Python test code or a non-empty "
            f"list of them (e.g. ['assert f(1) == 2']), got {tests!r:.200}"
        )
    answer = _column(row, "answer", "code_reward")
    code = extract_code(answer) if isinstance(answer, str) else ""
    return run_python(code, tests, timeout=timeout, memory_mb=memory_mb).score


# -- finding rewards by name --------------------------------------------------------------
REWARDS: dict[str, Reward] = {"math": math_reward, "format": format_reward, "code": code_reward}


def reward_function(spec: str | Reward, **options) -> Reward:
    """The reward ``spec`` names: a key of ``REWARDS`` or ``"package.module:function"``
    (any importable module, e.g. ``my_rewards.py`` beside the training script); a callable
    is returned as it is. ``options`` are keyword arguments bound with
    ``functools.partial``. Anything else is a ``ConfigError`` saying what to write.

    >>> reward_function("math") is math_reward
    True
    >>> reward_function("code", timeout=2.0).keywords
    {'timeout': 2.0}
    >>> reward_function("maht")
    Traceback (most recent call last):
    ...
    flowgraph.errors.ConfigError: unknown reward 'maht'; did you mean 'math'? ...
    """
    if callable(spec):
        fn = spec
    elif not isinstance(spec, str):
        raise ConfigError(f"a reward is a name or 'package.module:function', got {spec!r}")
    elif ":" in spec:
        fn = _import(spec)
    elif spec in REWARDS:
        fn = REWARDS[spec]
    else:
        raise ConfigError(
            f"unknown reward {spec!r}; {did_you_mean(spec, REWARDS)}rewards: "
            f"{', '.join(sorted(REWARDS))}, or 'package.module:function' for your own"
        )
    if not options:
        return fn
    try:
        inspect.signature(fn).bind_partial(None, **options)
    except TypeError as err:
        raise ConfigError(f"reward {_name(fn)}: options {options} do not fit it ({err})") from None
    except ValueError:  # no signature to check (a builtin)
        pass
    return functools.partial(fn, **options)


def _import(spec: str) -> Reward:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"reward {spec!r}: expected 'package.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or any error the module raises as it loads
        raise ConfigError(
            f"reward {spec!r}: cannot import {module_name!r} ({type(err).__name__}: {err}); "
            "the module must be importable where the run starts: a file in the training "
            "script's directory or on PYTHONPATH, or an installed package"
        ) from err
    for part in attribute.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ConfigError(
                f"reward {spec!r}: {module_name!r} has no {attribute!r}; "
                f"{did_you_mean(part, names)}define it there or fix the name"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(
            f"reward {spec!r} is a {type(obj).__name__}, not a function; a reward is a "
            "function of one row (a dict) returning a float"
        )
    return obj


def _name(fn: Callable) -> str:
    """``module:function`` (the spec that names it), for messages."""
    if isinstance(fn, functools.partial):
        return f"{_name(fn.func)} (with {fn.keywords})"
    qualname = getattr(fn, "__qualname__", type(fn).__qualname__)
    return f"{getattr(fn, '__module__', '?')}:{qualname}"


# -- scoring rows -------------------------------------------------------------------------
def _as_float(value) -> float | None:
    if isinstance(value, str | bytes) or not (
        isinstance(value, numbers.Real) or hasattr(value, "__float__")
    ):
        return None
    try:
        return float(value)  # a bool, a NumPy number, a one-element tensor
    except (TypeError, ValueError, RuntimeError):
        return None


def _score_row(fn: Reward, name: str, index: int, row: dict) -> float:
    try:
        value = fn(row)
    except Exception as err:
        prompt = row.get("prompt") if isinstance(row, dict) else None
        about = f" (prompt {prompt[:60]!r})" if isinstance(prompt, str) else ""
        raise RewardError(
            f"reward {name} raised on row {index}{about}: {type(err).__name__}: {err}"
        ) from err
    score = _as_float(value)
    if score is None:
        raise RewardError(
            f"reward {name} returned {value!r:.100} ({type(value).__name__}) for row {index}; "
            "a reward returns a float (an int or a bool will do)"
        )
    if not math.isfinite(score):
        raise RewardError(f"reward {name} returned {score} for row {index}; rewards are finite")
    return score


def _score_in_worker(fn: Reward, name: str, index: int, row: dict) -> float | str:
    """A worker's ``_score_row``: the score, or the error's message and traceback (sent
    back as text, since the user's exception may not unpickle in the caller)."""
    try:
        return _score_row(fn, name, index, row)
    except RewardError as err:
        cause = err.__cause__
        trace = "".join(traceback.format_exception(cause)) if cause is not None else ""
        return f"{err}\n\nin the worker process:\n{trace}" if trace else str(err)


_POOLS: dict[int, ProcessPoolExecutor] = {}


def _pool(workers: int) -> ProcessPoolExecutor:
    """The pool of ``workers`` processes, started once and kept for later calls. "spawn",
    not "fork": the caller holds torch and gloo threads, which a forked child would
    inherit in whatever state they were (locks held by threads that no longer exist)."""
    if workers not in _POOLS:
        context = multiprocessing.get_context("spawn")
        _POOLS[workers] = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    return _POOLS[workers]


def shutdown_pools() -> None:
    """Stops the worker processes of ``score_rows`` (also done at exit)."""
    while _POOLS:
        _POOLS.popitem()[1].shutdown(wait=False, cancel_futures=True)  # a hung reward: no wait


atexit.register(shutdown_pools)


def batch_rows(data: dict, prompts: list[str]) -> list[dict]:
    """The rows a reward scores from a batch: every column that is a list (the dataset's
    text and number columns, the policy's ``answer``), one dict per row, with ``prompt``
    set to ``prompts`` (the module's ``prompt_key`` column). Tensors (token ids, masks,
    log-probs) are left out: rewards read text, and rows stay cheap to send to workers.

    >>> import torch
    >>> batch_rows({"question": ["1+1"], "answer": ["2"], "ids": torch.zeros(1, 3)}, ["1+1"])
    [{'question': '1+1', 'answer': '2', 'prompt': '1+1'}]
    """
    columns = {key: value for key, value in data.items() if isinstance(value, list | tuple)}
    return [{**{key: value[i] for key, value in columns.items()}, "prompt": prompt}
            for i, prompt in enumerate(prompts)]  # fmt: skip


def score_rows(fn: Reward, rows: list[dict], workers: int = 0) -> list[float]:
    """``[fn(row) for row in rows]`` as floats; with ``workers > 0`` in a pool of that many
    processes (kept alive across calls), for rewards slow enough to pay for it.

    A reward that raises, or returns something other than a finite number, is a bug to
    fix, not a score: a ``RewardError`` naming the function and the row's index (a code
    answer that crashes is not such a failure: ``code_reward`` scores it 0). With
    workers, ``fn`` must pickle: a module-level function of an importable module or a
    ``functools.partial`` of one (not a lambda or a nested function), and a training
    script keeps its launching code under ``if __name__ == "__main__":``, since the
    workers import it (the rule of Python's multiprocessing).

    >>> rows = [{"answer": "x"}, {"answer": "<think></think><answer>1</answer>"}]
    >>> score_rows(format_reward, rows)
    [0.0, 1.0]
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ConfigError(f"score_rows: workers must be a whole number >= 0, got {workers!r}")
    name = _name(fn)
    rows = list(rows)
    if workers == 0 or not rows:
        return [_score_row(fn, name, i, row) for i, row in enumerate(rows)]
    try:
        pickle.dumps(fn)
    except Exception as err:
        raise RewardError(
            f"reward {name} cannot be sent to worker processes ({type(err).__name__}: {err}); "
            "with workers > 0 a reward must be a module-level function of an importable "
            "module (or a functools.partial of one), not a lambda or a nested function"
        ) from None
    chunksize = max(1, len(rows) // (4 * workers))
    try:
        outcomes = list(
            _pool(workers).map(_score_in_worker, repeat(fn), repeat(name), range(len(rows)),
                               rows, chunksize=chunksize)
        )  # fmt: skip
    except BrokenProcessPool as err:
        _POOLS.pop(workers, None)
        raise RewardError(
            f"a worker process died while scoring with reward {name} (killed, out of memory, "
            "a crash in native code, or the reward's module failed to import there); the "
            "pool restarts on the next call"
        ) from err
    except Exception as err:  # the rows or results could not be pickled
        raise RewardError(
            f"scoring with reward {name} in worker processes failed ({type(err).__name__}: "
            f"{err}); rows and scores must pickle"
        ) from err
    for outcome in outcomes:
        if isinstance(outcome, str):
            raise RewardError(outcome)
    return outcomes

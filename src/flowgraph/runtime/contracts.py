"""What user code must hand back, checked where it returns: model calls in flows (a dict
batch with one row per sample under every key), ``train_step`` (a dict of metrics or
None) and ``post_process`` (a dict of metrics). A breach is a ``DataError`` that names
the model and method (or the hook), the key and the flow's source line, instead of a
``TypeError`` from deep inside flowgraph later.

Example::

    >>> import torch
    >>> metrics("ppo_policy.train_step", {"loss": torch.tensor(0.5), "steps": 2})
    {'loss': 0.5, 'steps': 2.0}
    >>> metrics("ppo_policy.train_step", {"note": "ok"})
    Traceback (most recent call last):
    ...
    flowgraph.errors.DataError: ppo_policy.train_step returned metric 'note' = 'ok' (a str); ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from flowgraph.data import rows_of, short_repr
from flowgraph.errors import DataError


def check_batch(where: str, result: Any, rows_in: int) -> None:
    """``result`` of a model call ``where`` (``"reward.forward_step (train.py:41)"``) on
    ``rows_in`` samples: a dict whose every value has one entry per row, the same number
    for every key (it may differ from ``rows_in``: a policy may answer each prompt several
    times, a filter may drop rows)."""
    if not isinstance(result, Mapping):
        raise DataError(
            f"{where} returned a {type(result).__name__}; a model call in a flow must "
            "return a dict batch, e.g. return {**data, 'y': y}"
        )
    rows: dict[str, int] = {}
    for key, value in result.items():
        if not isinstance(key, str):
            raise DataError(f"{where} returned a dict with the key {key!r}; keys are strings")
        rows[key] = rows_of(key, value, owner=f"the output of {where}")
    counts = set(rows.values())
    if len(counts) > 1:
        detail = ", ".join(f"{k}: {n}" for k, n in rows.items())
        raise DataError(
            f"{where} returned keys with different numbers of rows ({detail}); every key "
            "needs one entry per sample"
        )


def metrics(where: str, result: Any) -> dict[str, float]:
    """The numeric metrics of a hook's ``result``: numbers and one-element tensors become
    floats; anything else is refused by name. ``None`` is no metrics."""
    if result is None:
        return {}
    if not isinstance(result, Mapping):
        raise DataError(
            f"{where} returned a {type(result).__name__}; return a dict of metrics "
            "(name -> number), e.g. {'loss': loss.item()}, or None"
        )
    numbers = {}
    for key, value in result.items():
        converted = number(value)
        if converted is None:
            raise DataError(
                f"{where} returned metric {key!r} = {short_repr(value)} (a "
                f"{type(value).__name__}); a metric is a number or a one-element tensor: log "
                "other values yourself"
            )
        numbers[str(key)] = converted
    return numbers


def number(value: Any) -> float | None:
    """``value`` as a float when it is one number (a Python number, a one-element tensor
    or NumPy array/scalar), else None."""
    if isinstance(value, bool | int | float):
        return float(value)
    size = getattr(value, "numel", getattr(value, "size", None))
    size = size() if callable(size) else size
    if size == 1 and hasattr(value, "item"):
        item = value.item()
        return float(item) if isinstance(item, bool | int | float) else None
    return None


def non_finite(values: Mapping[str, float]) -> list[str]:
    """The keys of ``values`` that are NaN or infinite."""
    return [k for k, v in values.items() if not math.isfinite(v)]

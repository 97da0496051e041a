"""Batches: collate, split, concatenate and merge along the sample axis (dim 0).

A batch is a ``dict[str, Tensor | list]`` whose values all have the same length on dim 0::

    >>> b = collate([{"x": torch.zeros(2), "s": "a"}, {"x": torch.ones(2), "s": "b"}])
    >>> b["x"].shape, b["s"]
    (torch.Size([2, 2]), ['a', 'b'])
    >>> [batch_size(p) for p in split(concat([b, b]), 3)]
    [3, 1]
"""

from __future__ import annotations

import array
import hashlib
import numbers
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from flowgraph.datafiles import check_path, is_path, open_rows
from flowgraph.errors import BatchMergeError, DataError

Batch = dict[str, Any]
DataSource = Sequence[Any] | str | os.PathLike  # samples, or a dataset file's path


def to_sample(item: Any, index: int) -> dict[str, Any]:
    """One dataset entry as a sample dict: a str becomes ``{"prompt": s}``."""
    if isinstance(item, str):
        return {"prompt": item}
    if isinstance(item, Mapping):
        if not all(isinstance(k, str) for k in item):
            raise DataError(f"dataset sample {index} has non-string keys: {list(item)!r}")
        return dict(item)
    raise DataError(
        f"dataset sample {index} is a {type(item).__name__}; a sample must be a dict "
        f"(str -> tensor, number, str, list) or a str (it becomes {{'prompt': s}})"
    )


def collate(samples: Sequence[Mapping[str, Any]]) -> Batch:
    """Samples into one batch: equal-shape tensors stacked on a new dim 0, the rest lists."""
    if not samples:
        raise DataError("cannot collate an empty list of samples")
    keys = list(samples[0])
    for i, sample in enumerate(samples):
        if list(sample) != keys and set(sample) != set(keys):
            raise DataError(
                f"sample {i} has keys {sorted(sample)} but sample 0 has {sorted(keys)}; "
                "every sample in a dataset needs the same keys"
            )
    batch: Batch = {}
    for key in keys:
        values = [s[key] for s in samples]
        if all(isinstance(v, torch.Tensor) for v in values) and _same_shape(values):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


def _same_shape(tensors: Sequence[torch.Tensor]) -> bool:
    first = tensors[0]
    return all(t.shape == first.shape and t.dtype == first.dtype for t in tensors)


def batch_size(batch: Mapping[str, Any]) -> int:
    """Number of samples in ``batch``; raises ``DataError`` when its values disagree."""
    sizes = {key: rows_of(key, value) for key, value in batch.items()}
    distinct = set(sizes.values())
    if len(distinct) > 1:
        detail = ", ".join(f"{k}: {n}" for k, n in sizes.items())
        raise DataError(f"batch values have different lengths on dim 0 ({detail})")
    return distinct.pop() if distinct else 0


def rows_of(key: str, value: Any, owner: str = "batch") -> int:
    """The rows of batch value ``value`` (dim 0 of a tensor, the length of a list); a
    ``DataError`` naming ``owner`` and ``key`` for values without a sample axis."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            raise DataError(
                f"{owner}: key {key!r} holds a 0-dim tensor; a batch value needs one entry per "
                "sample (dim 0): a tensor of shape [batch, ...] (e.g. x.expand(n)) or a list"
            )
        return value.shape[0]
    if isinstance(value, list | tuple):
        return len(value)
    raise DataError(
        f"{owner}: key {key!r} holds a {type(value).__name__} ({short_repr(value)}); a batch "
        "value is a tensor [batch, ...] or a list with one entry per sample"
    )


def select(batch: Mapping[str, Any], index: Sequence[int] | slice) -> Batch:
    """Rows ``index`` of every value of ``batch`` (a slice or a list of sample indices)."""
    out: Batch = {}
    for key, value in batch.items():
        if isinstance(index, slice):
            out[key] = value[index]
        elif isinstance(value, torch.Tensor):
            out[key] = value[torch.as_tensor(list(index), dtype=torch.long)]
        else:
            out[key] = [value[i] for i in index]
    return out


def split(batch: Mapping[str, Any], size: int) -> list[Batch]:
    """``batch`` cut into consecutive pieces of ``size`` samples (the last may be shorter)."""
    if size < 1:
        raise DataError(f"split size must be >= 1, got {size}")
    total = batch_size(batch)
    return [select(batch, slice(start, start + size)) for start in range(0, total, size)]


def concat(batches: Sequence[Mapping[str, Any]]) -> Batch:
    """Batches joined along dim 0; tensors whose trailing shapes differ become lists."""
    if not batches:
        raise DataError("cannot concatenate an empty list of batches")
    if len(batches) == 1:
        return dict(batches[0])
    keys = list(batches[0])
    for i, b in enumerate(batches[1:], start=1):
        if set(b) != set(keys):
            raise DataError(
                f"cannot concatenate batches with different keys: batch 0 has "
                f"{sorted(keys)}, batch {i} has {sorted(b)}"
            )
    out: Batch = {}
    for key in keys:
        parts = [b[key] for b in batches]
        if all(isinstance(p, torch.Tensor) for p in parts) and _cat_compatible(parts):
            out[key] = torch.cat(parts)
        else:
            out[key] = [row for part in parts for row in _rows(part)]
    return out


def _cat_compatible(parts: Sequence[torch.Tensor]) -> bool:
    first = parts[0]
    return all(p.shape[1:] == first.shape[1:] and p.dtype == first.dtype for p in parts)


def _rows(value: Any) -> list[Any]:
    return list(value.unbind(0)) if isinstance(value, torch.Tensor) else list(value)


def merge_inputs(
    inputs: Sequence[Mapping[str, Any]], producers: Sequence[str], check_values: bool = True
) -> Batch:
    """The union of a model's input batches, in argument order.

    A key present in two inputs must hold equal values (the common case: every model
    returns ``{**data, new_key: ...}``); unequal values raise ``BatchMergeError`` that
    names the key and both producers. Values that are the same object merge at once;
    otherwise their kind, shape and dtype (or length) must agree, and their contents are
    compared only with ``check_values`` (``runtime.check_merges``): a batch received from
    another rank holds copies, whose comparison costs milliseconds per merge.

    >>> a = {"x": torch.ones(2)}
    >>> merge_inputs([a, {**a, "y": [1, 2]}], ["policy", "reward"])
    {'x': tensor([1., 1.]), 'y': [1, 2]}
    """
    if len(inputs) == 1:
        return dict(inputs[0])
    merged: Batch = {}
    owner: dict[str, str] = {}
    for batch, producer in zip(inputs, producers, strict=True):
        for key, value in batch.items():
            if key in merged and not _equal(merged[key], value, check_values):
                raise BatchMergeError(
                    f"key {key!r} comes from both {owner[key]} and {producer} with "
                    f"different values; rename it in one of them (the model receives one "
                    f"dict, the union of its inputs)"
                )
            if key not in merged:
                merged[key] = value
                owner[key] = producer
    return merged


def _equal(a: Any, b: Any, check_values: bool = True) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        return not check_values or bool(torch.equal(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return False
        return not check_values or all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if not check_values:
        return type(a) is type(b)
    try:
        return bool(a == b)
    except Exception:
        return False


def schema_problem(data: Mapping[str, Any], schema: Mapping[str, type | tuple]) -> str | None:
    """The first key of ``schema`` that ``data`` lacks or holds with another type
    (``"'history' is missing"``, ``"'episode' is a str"``), or None. Booleans do not pass
    for numbers.

    >>> schema_problem({"episode": "2"}, {"episode": int})
    "'episode' is a str"
    """
    for key, kind in schema.items():
        value = data.get(key)
        if key not in data:
            return f"{key!r} is missing"
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{key!r} is a {type(value).__name__}"
    return None


def short_repr(value: Any, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str | None:
    """The family a sample value belongs to (values of one key must share it), or None
    for values any family may hold (None, dicts, other objects: they collate as lists)."""
    if isinstance(value, torch.Tensor):
        return f"{value.dim()}-dim tensor"
    if isinstance(value, bool | numbers.Number):  # NumPy scalars too (pandas, Parquet)
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list | tuple):
        return "list"
    return None


def checked_source(samples: DataSource, what: str) -> DataSource:
    """``samples`` after the checks that are cheap at the user's ``set_dataset`` line: a
    list's samples and schema, a path's existence and format (the file is opened when the
    run starts)."""
    if is_path(samples):
        check_path(samples, what)
    else:
        _sample_list(samples, what)
    return samples


def _sample_list(samples: Any, what: str) -> list[dict[str, Any]]:
    """A list of dicts or strings as checked sample dicts."""
    if isinstance(samples, bytes | Mapping) or not isinstance(samples, Sequence):
        raise DataError(
            f"{what} must be a list of samples (dicts or strings) or a dataset file's path, "
            f"got {type(samples).__name__}; e.g. set_dataset([{{'prompt': 'hi'}}, ...]) or "
            "set_dataset('prompts.jsonl')"
        )
    if len(samples) == 0:
        raise DataError(f"{what} is empty; pass at least one sample")
    rows = [to_sample(item, i) for i, item in enumerate(samples)]
    check_schema(rows, what)
    return rows


def check_schema(samples: Sequence[Mapping[str, Any]], what: str = "dataset") -> None:
    """Every sample has sample 0's keys, and a key holds one family of values throughout
    (tensors of one rank, numbers, strings or lists; None or a dict may stand anywhere);
    the first sample that breaks this is named with its index."""
    first = samples[0]
    kinds: dict[str, str | None] = {key: _kind(value) for key, value in first.items()}
    origin = dict.fromkeys(first, 0)
    for index, sample in enumerate(samples):
        if sample.keys() != first.keys():
            missing = sorted(first.keys() - sample.keys())
            extra = sorted(sample.keys() - first.keys())
            raise DataError(
                f"{what} sample {index} has keys {sorted(sample)}, sample 0 has {sorted(first)}"
                f" (missing {missing}, extra {extra}); every sample needs the same keys"
            )
        for key, value in sample.items():
            kind = _kind(value)
            if kind is None:
                continue
            if kinds[key] is None:
                kinds[key], origin[key] = kind, index
            elif kind != kinds[key]:
                raise DataError(
                    f"{what} sample {index} key {key!r} holds a {kind} ({type(value).__name__}), "
                    f"sample {origin[key]}'s a {kinds[key]}; one key holds one kind of value "
                    "in every sample"
                )


class Dataset:
    """A user's samples, drawn from in a seeded order that depends only on
    ``(seed, position)``: the same samples on every rank and after a resume.

    ``samples`` is a list of dicts or strings, or the path of a dataset file (``.jsonl``,
    ``.json``, ``.parquet``, ``.csv``) or ``datasets.save_to_disk`` directory, which is
    memory-mapped and decoded row by row (``flowgraph.datafiles``); a file and the list of
    its rows give the same draws.

    Example::

        >>> ds = Dataset(["a", "b", "c"], seed=0)
        >>> len(ds.draw(start=0, count=5))    # wraps into a new shuffled pass
        5
    """

    def __init__(self, samples: Any, seed: int, what: str = "dataset") -> None:
        self.what = what
        self.source = str(samples) if is_path(samples) else "a list"
        if is_path(samples):
            rows = open_rows(samples, what)
            if untyped := rows.untyped_columns():
                check_schema(untyped, f"{what} {rows.path}")
            self.samples: Sequence[dict[str, Any]] = rows
        else:
            self.samples = _sample_list(samples, what)
        self.seed = seed
        self._orders: dict[int, Sequence[int]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def fingerprint(self) -> str:
        """A digest of the rows' count and of the first and last rows: ranks (or a resumed
        run) that compare it see whether they hold the same data."""
        n = len(self.samples)
        ends = [self.samples[i] for i in sorted({0, 1, 2, n - 3, n - 2, n - 1}) if 0 <= i < n]
        text = f"{n}:{ends!r}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def __str__(self) -> str:
        return f"Dataset({len(self)} samples from {self.source})"

    def _order(self, data_epoch: int) -> list[int]:
        if data_epoch not in self._orders:
            order = array.array("q", range(len(self.samples)))  # 8 bytes a row, not a list
            random.Random(self.seed * 1_000_003 + data_epoch).shuffle(order)
            self._orders = {data_epoch: order}  # one pass at a time is enough
        return self._orders[data_epoch]

    def draw(self, start: int, count: int) -> list[dict[str, Any]]:
        """``count`` samples from shuffled position ``start`` on (passes wrap around)."""
        n = len(self.samples)
        return [self.samples[self._order(pos // n)[pos % n]] for pos in range(start, start + count)]


class StreamDataset:
    """One episode's environment output, per sample, served as training batches.

    Example::

        >>> stream = StreamDataset([{"x": torch.arange(6)}])
        >>> [b["x"].tolist() for b in stream.global_batches(4, seed=0, epoch=0)]
        [[2, 5, 3, 0]]
    """

    def __init__(self, outputs: Sequence[Mapping[str, Any]]) -> None:
        self.batch = concat(outputs)
        self.size = batch_size(self.batch)

    def __len__(self) -> int:
        return self.size

    def __str__(self) -> str:
        return f"StreamDataset({self.size} samples, keys={sorted(self.batch)})"

    def global_batches(self, global_size: int, seed: int, epoch: int) -> Iterator[Batch]:
        """Shuffled batches of ``global_size`` samples; an incomplete last one is dropped
        (an env flow that drops rows, e.g. DAPO's filter, may leave none)."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        for start in range(0, self.size - global_size + 1, global_size):
            yield select(self.batch, order[start : start + global_size])

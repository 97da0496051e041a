"""Datasets from files: JSON lines, JSON, Parquet, CSV, or a ``datasets.save_to_disk``
directory, opened with Hugging Face ``datasets`` as memory-mapped Arrow tables.

A file is converted to Arrow once (in the ``datasets`` cache, ``HF_DATASETS_CACHE``; the
ranks of a job share the conversion through its file lock) and then mapped, never read
into Python objects: every rank maps the same pages, and a row becomes a sample dict only
when an episode draws it. A file's rows are the samples a list of the same dicts would be,
so a run on ``prompts.jsonl`` trains exactly as one on ``json.load``-ed rows, where the
rows have the same keys and one type per column (Arrow types a column once: mixed ints
and floats read as floats, a missing key as None). CSV has no types: its columns are read
as text.

Example::

    >>> import json, pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "prompts.jsonl"
    >>> _ = path.write_text(json.dumps({"prompt": "12", "solution": "3"}) + "\\n")
    >>> rows = open_rows(path)
    >>> len(rows), rows[0]
    (1, {'prompt': '12', 'solution': '3'})
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from flowgraph.errors import DataError

SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
FORMATS = ".jsonl, .json, .parquet, .csv or a datasets.save_to_disk directory"


def is_path(source: Any) -> bool:
    """Whether a dataset ``source`` names a file (a str or ``os.PathLike``)."""
    return isinstance(source, str | os.PathLike)


def check_path(source: str | os.PathLike, what: str = "dataset") -> Path:
    """``source`` as a Path to a readable dataset file or directory, or a ``DataError``
    that names the problem (missing, unknown suffix) and the formats there are."""
    path = Path(source).expanduser()
    if not path.exists():
        hint = ""
        if path.suffix.lower() not in SUFFIXES:  # perhaps one prompt, meant as a sample
            hint = "; to train on strings pass a list of them, e.g. set_dataset(['1+1=', ...])"
        raise DataError(f"{what} {str(source)!r} does not exist{hint} (formats: {FORMATS})")
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
            raise DataError(
                f"{what} {str(path)!r} is a directory but not one written by "
                f"datasets.Dataset.save_to_disk (no dataset_info.json); formats: {FORMATS}"
            )
    elif path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{what} {str(path)!r}: unknown file type {path.suffix!r}; use {FORMATS}")
    return path


class FileRows(Sequence):
    """The rows of an Arrow table (``datasets.Dataset``) as a read-only sequence of sample
    dicts, decoded one at a time."""

    def __init__(self, table: Any, path: Path) -> None:
        self.table = table
        self.path = path

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self.table[i] for i in range(*index.indices(len(self)))]
        return self.table[index]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self.table[i] for i in range(len(self)))

    @property
    def columns(self) -> list[str]:
        return list(self.table.column_names)

    def untyped_columns(self) -> list[dict[str, Any]]:
        """The values of the columns ``datasets`` could give no single type (its ``Json``
        feature: numbers in some rows, text in others), as one dict per row ([] when
        every column has a type); ``flowgraph.data.check_schema`` checks them as it
        checks a list's samples."""
        import datasets

        json_feature = getattr(datasets.features, "Json", None)
        names = [name for name, feature in self.table.features.items()
                 if json_feature is not None and isinstance(feature, json_feature)]  # fmt: skip
        if not names:
            return []
        columns = zip(*(self.table[name] for name in names), strict=True)
        return [dict(zip(names, values, strict=True)) for values in columns]

    def __str__(self) -> str:
        return f"{self.path} ({len(self)} rows: {', '.join(self.columns)})"


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """``datasets`` without its progress bars and log lines (one per rank otherwise)."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            "reading a dataset file needs the `datasets` package: pip install datasets "
            "(make install includes it)"
        ) from None
    bars = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _cause(err: BaseException | None) -> str:
    """The most specific message in ``err``'s chain: pyarrow's (a parse error with its
    row), else the innermost."""
    messages: list[tuple[str, str]] = []
    while err is not None:
        if str(err):
            messages.append((type(err).__name__, str(err).splitlines()[0]))
        err = err.__cause__ or err.__context__
    arrow = [text for kind, text in messages if kind.startswith("Arrow")]
    return arrow[0] if arrow else messages[-1][1] if messages else "no details"


def _load(datasets: Any, path: Path) -> Any:
    if path.is_dir():
        table = datasets.load_from_disk(str(path))
        if isinstance(table, datasets.DatasetDict):
            splits = list(table)
            if "train" not in table and len(splits) != 1:
                raise DataError(
                    f"{path} holds the splits {splits}; pass one split's directory "
                    f"(e.g. {path / splits[0]}) or save a single Dataset"
                )
            table = table["train" if "train" in table else splits[0]]
        return table
    kind = SUFFIXES[path.suffix.lower()]
    options: dict[str, Any] = {}
    if kind == "csv":  # no types in CSV: every column is text ("0042" stays "0042")
        with path.open(newline="") as handle:
            header = next(csv.reader(handle), [])
        options["features"] = datasets.Features({c: datasets.Value("string") for c in header})
    table = datasets.load_dataset(kind, data_files=str(path), split="train", **options)
    _release_conversion_memory()
    return table


def _release_conversion_memory() -> None:
    """Hand the buffers of a first-time conversion to Arrow back to the system: pyarrow's
    pool and the C heap keep them otherwise (measured: 87 MB held after converting a
    40 MB JSONL file, 16 MB after this), for the whole run of that rank."""
    import gc

    import pyarrow

    gc.collect()
    pyarrow.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def open_rows(source: str | os.PathLike, what: str = "dataset") -> FileRows:
    """The rows of the dataset file or directory ``source``, memory-mapped; a ``DataError``
    naming the file and the cause when it cannot be read or holds no rows."""
    path = check_path(source, what)
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{what} {path} is an empty file; a dataset needs at least one sample")
    with _quiet_datasets() as datasets:
        try:
            table = _load(datasets, path)
        except DataError:
            raise
        except Exception as err:
            raise DataError(f"{what} {path}: cannot read it: {_cause(err)}") from None
        rows = FileRows(table, path)
        if len(rows) == 0:
            raise DataError(f"{what} {path} holds no rows; a dataset needs at least one sample")
    return rows

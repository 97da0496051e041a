"""What an episode's data is: a function of the config and the episode, on every rank.

- ``env_micro_batches``: the episode's samples, drawn by ``(seed, episode)``, collated
  into micro-batches of ``generation_batch_size`` (micro-batch *k* is the same batch on
  every rank, so the rank that owns it reads it locally: prompts never travel);
- ``eval_micro_batches``: the evaluation set in micro-batches, in order;
- ``training_steps``: the episode's output shuffled into global batches, each split into
  micro-batches of ``train_micro_batch_size``, for every epoch.

Example::

    >>> from flowgraph.config import RuntimeConfig
    >>> rt = RuntimeConfig(sample_per_episode=6, generation_batch_size=4)
    >>> [len(mb["prompt"]) for mb in env_micro_batches(Dataset(list("abcdefg"), 0), rt, 1)]
    [4, 2]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from flowgraph.config import RuntimeConfig
from flowgraph.data import Batch, Dataset, StreamDataset, batch_size, collate, split


def micro_batches(samples: Sequence[dict], size: int) -> list[Batch]:
    return [collate(samples[i : i + size]) for i in range(0, len(samples), size)]


def env_micro_batches(dataset: Dataset, runtime: RuntimeConfig, episode: int) -> list[Batch]:
    count = runtime.sample_per_episode
    samples = dataset.draw((episode - 1) * count, count)
    return micro_batches(samples, runtime.generation_batch_size)


def eval_micro_batches(dataset: Dataset, runtime: RuntimeConfig) -> list[Batch]:
    return micro_batches(dataset.samples, runtime.generation_batch_size)


def weight_version(episode: int, staleness: int, sync_frequencies: Sequence[int]) -> int:
    """The trained weights that generate ``episode`` with ``runtime.max_staleness``
    ``staleness`` (k): those of the last sync due at or before episode ``episode - 1 - k``
    (0: the initial weights), the oldest over the pairs' ``sync_frequency``. A function of
    the episode number only, so every run and every placement agrees.

    >>> [weight_version(e, 1, [1]) for e in range(1, 6)]
    [0, 0, 1, 2, 3]
    >>> [weight_version(e, 0, [2]) for e in range(1, 6)]
    [0, 0, 2, 2, 4]
    """
    latest = episode - 1 - staleness
    return min(
        (max((u for u in range(latest, 0, -1) if u % f == 0), default=0)
         for f in sync_frequencies),
        default=0,
    )  # fmt: skip


def with_columns(batch: Batch, columns: Mapping[str, int]) -> Batch:
    """``batch`` with one int64 column per ``columns`` entry, every row holding its value
    (e.g. ``weight_version``: the trained weights that generated the rows)."""
    if not columns:
        return batch
    rows = batch_size(batch)
    return {**batch, **{key: torch.full((rows,), value) for key, value in columns.items()}}


def training_steps(
    outputs: Sequence[Batch], runtime: RuntimeConfig, episode: int
) -> list[list[Batch]]:
    """Every optimizer step of the episode, as its list of micro-batches."""
    stream = StreamDataset(outputs)
    steps = []
    for epoch in range(runtime.num_training_epoch):
        batches = stream.global_batches(
            runtime.global_batch_size, seed=runtime.seed + episode, epoch=epoch
        )
        steps += [split(batch, runtime.train_micro_batch_size) for batch in batches]
    return steps

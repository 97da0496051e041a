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

from collections.abc import Sequence

from flowgraph.config import RuntimeConfig
from flowgraph.data import Batch, Dataset, StreamDataset, collate, split


def micro_batches(samples: Sequence[dict], size: int) -> list[Batch]:
    return [collate(samples[i : i + size]) for i in range(0, len(samples), size)]


def env_micro_batches(dataset: Dataset, runtime: RuntimeConfig, episode: int) -> list[Batch]:
    count = runtime.sample_per_episode
    samples = dataset.draw((episode - 1) * count, count)
    return micro_batches(samples, runtime.generation_batch_size)


def eval_micro_batches(dataset: Dataset, runtime: RuntimeConfig) -> list[Batch]:
    return micro_batches(dataset.samples, runtime.generation_batch_size)


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

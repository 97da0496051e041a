"""What a run needs besides its plan: the config, the live modules, the data.

Example::

    job = Job(config, modules={"policy": policy, ...}, dataset=Dataset(prompts, seed=1234))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flowgraph.config import Config
from flowgraph.data import Batch, Dataset
from flowgraph.module import BaseModule
from flowgraph.precision import resolve


@dataclass
class Job:
    """The modules by name, the training (and evaluation) data, and ``post_process``,
    which turns the eval flow's outputs into metrics on rank 0."""

    config: Config
    modules: Mapping[str, BaseModule]
    dataset: Dataset
    eval_dataset: Dataset | None = None
    post_process: Callable[[list[Batch]], Mapping[str, Any]] | None = None
    log: Callable[[str], None] = print
    on_setup: Callable[[], None] = lambda: None  # called before the first model's setup()

    def precisions(self, device_type: str) -> dict[str, str]:
        """Every model's precision on ``device_type``, ``auto`` resolved (``fp32``, ...)."""
        return {name: resolve(self.config.model(name).precision, device_type)
                for name in self.modules}  # fmt: skip

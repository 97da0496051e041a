"""Which device this process computes on: its CUDA device when there is one, unless
``FLOWGRAPH_DEVICE=cpu`` keeps a GPU machine on the CPU; else the CPU.

Example::

    >>> import os
    >>> os.environ["FLOWGRAPH_DEVICE"] = "cpu"
    >>> rank_device(0)
    device(type='cpu')
    >>> del os.environ["FLOWGRAPH_DEVICE"]
"""

from __future__ import annotations

import os

import torch


def cuda_wanted() -> bool:
    """A CUDA device is there and ``FLOWGRAPH_DEVICE`` does not say ``cpu``."""
    return torch.cuda.is_available() and os.environ.get("FLOWGRAPH_DEVICE", "") != "cpu"


def rank_device(local_rank: int) -> torch.device:
    """The device of the process with ``local_rank`` on its machine."""
    return torch.device("cuda", local_rank) if cuda_wanted() else torch.device("cpu")

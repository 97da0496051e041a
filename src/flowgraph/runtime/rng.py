"""Placement-independent random numbers.

Every model's ``setup()`` and every inference call on a micro-batch starts from a seed
derived from the run's seed and *what* runs (model, episode, micro-batch), never from
*where* it runs. So a model is initialised identically on 1 or 64 ranks, and sampling a
micro-batch gives the same tokens whichever data-parallel rank owns it. ``rng_state`` and
``set_rng_state`` capture and restore a process's generators for checkpoints.

Example::

    >>> seed_for(1234, "setup", "policy") == seed_for(1234, "setup", "policy")
    True
    >>> seed_for(1234, "env", 1, "policy_out", 0) != seed_for(1234, "env", 1, "policy_out", 1)
    True
"""

from __future__ import annotations

import random
import sys
import zlib
from typing import Any

import torch


def seed_for(seed: int, *parts: object) -> int:
    """A 31-bit seed determined by ``seed`` and ``parts`` only."""
    key = "/".join(str(p) for p in (seed, *parts)).encode()
    return zlib.crc32(key) & 0x7FFFFFFF


def reseed(seed: int, *parts: object) -> None:
    """Seed torch's and Python's global generators from ``seed_for(seed, *parts)``.

    Not ``torch.manual_seed``: before CUDA is initialised it queues a lazy seeding call
    with a formatted stack trace for every accelerator type (about 0.1-0.3 ms per call,
    and the queue grows); the CPU generator is seeded directly, CUDA's only once live.
    """
    value = seed_for(seed, *parts)
    torch.default_generator.manual_seed(value)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(value)
    random.seed(value)


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain values (``weights_only``-loadable)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if "numpy" in sys.modules:
        kind, keys, pos, has_gauss, cached = sys.modules["numpy"].random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured (a checkpoint's ``rng_rank<r>.pt``)."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state and "numpy" in sys.modules:
        np = sys.modules["numpy"]
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

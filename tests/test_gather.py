"""GATHER's tensor path: every member's batches on every member, any dtype, exact bytes."""

import os
import pickle

import pytest
import torch
import torch.distributed as dist

from flowgraph.runtime.transport import all_gather_batches
from spmd import init_gloo, spawn

pytestmark = pytest.mark.slow


def batch_of(rank: int, k: int) -> dict:
    """Odd sizes and dtypes, so that offsets are unaligned before padding."""
    g = torch.Generator().manual_seed(100 * rank + k)
    return {
        "tokens": torch.randint(0, 1000, (3, 5), generator=g),
        "logprobs": torch.randn(3, 7, generator=g).to(torch.bfloat16),
        "mask": torch.rand(3, 5, generator=g) > 0.5,
        "value": torch.randn(3, generator=g, dtype=torch.float64),
        "strided": torch.randn(5, 3, generator=g).t(),  # not contiguous
        "empty": torch.empty(0, 4),
        "text": [f"r{rank}k{k}"] * 3,
    }


def _worker(rank: int, port: int, out: str) -> None:
    init_gloo(rank, 3, port)
    # rank r owns micro-batches r, r+3, r+6; rank 2 owns none of 0..5
    mine = {k: batch_of(rank, k) for k in range(rank, 6, 3)} if rank < 2 else {}
    gathered = all_gather_batches(mine, dist.group.WORLD)
    with open(f"{out}.{rank}", "wb") as f:
        pickle.dump({k: {key: v for key, v in b.items()} for k, b in gathered.items()}, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def test_every_member_gets_every_batch_exactly(tmp_path):
    out = str(tmp_path / "gathered")
    spawn(_worker, args=(out,), nprocs=3, timeout=120)
    expected = {k: batch_of(k % 3, k) for k in (0, 3, 1, 4)}
    for rank in range(3):
        with open(f"{out}.{rank}", "rb") as f:
            got = pickle.load(f)
        assert sorted(got) == [0, 1, 3, 4]
        for k, want in expected.items():
            assert got[k].keys() == want.keys()
            for key, value in want.items():
                if isinstance(value, torch.Tensor):
                    assert got[k][key].dtype == value.dtype and got[k][key].shape == value.shape
                    assert torch.equal(got[k][key], value), (rank, k, key)
                else:
                    assert got[k][key] == value

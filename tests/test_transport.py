"""Batches across ranks: every dtype, ragged lists and strings arrive unchanged."""

import os
import pickle

import pytest
import torch
import torch.distributed as dist

from flowgraph.runtime.transport import (
    Outbox,
    _as_bytes,
    all_gather_objects,
    pack,
    recv_batch,
    unpack,
)
from spmd import init_gloo, spawn


def sample_batch():
    return {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(3, 2).half(),
        "bf16": torch.randn(3, 4).bfloat16(),
        "i64": torch.arange(3 * 7).reshape(3, 7),
        "mask": torch.tensor([True, False, True]),
        "scalarish": torch.tensor([1.5, 2.5, 3.5], dtype=torch.float64),
        "empty": torch.zeros(3, 0),
        "ragged": [torch.arange(2), torch.arange(5), torch.arange(1)],
        "text": ["a", "bé", "c c"],
        "meta": [{"id": 1}, {"id": 2}, None],
    }


def assert_same(a, b):
    assert list(a) == list(b)
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert b[key].dtype == value.dtype and torch.equal(b[key], value), key
        elif key == "ragged":
            assert all(torch.equal(x, y) for x, y in zip(value, b[key], strict=True))
        else:
            assert b[key] == value, key


def local_round_trip(batch):
    """pack, then unpack with each tensor's bytes copied in as the wire would deliver them."""
    meta, tensors = pack(batch)
    sent = iter([_as_bytes(t).clone() for t in tensors])

    def fill(empty):
        _as_bytes(empty).copy_(next(sent))  # a view: fills ``empty`` in place
        return empty

    return unpack(meta, fill)


def test_pack_round_trips_every_kind_of_value():
    batch = sample_batch()
    assert_same(batch, local_round_trip(batch))


def test_non_contiguous_tensors_travel_as_their_values():
    base = torch.arange(24.0).reshape(4, 6)
    batch = {"t": base.t()[:, ::2]}
    assert torch.equal(local_round_trip(batch)["t"], batch["t"])


def _worker(rank: int, port: int, out: str) -> None:
    init_gloo(rank, 2, port)
    torch.manual_seed(0)
    batch = sample_batch()
    if rank == 0:
        outbox = Outbox()
        outbox.send(batch, dst=1, tag=5)
        outbox.send({"second": ["x"]}, dst=1, tag=9)
        outbox.wait()
    else:
        second = recv_batch(src=0, tag=9)  # tags let transfers arrive in any order
        first = recv_batch(src=0, tag=5)
        gathered = all_gather_objects({"rank": rank}, dist.group.WORLD)
        with open(out, "wb") as f:
            pickle.dump((first, second, gathered), f)
    if rank == 0:
        all_gather_objects({"rank": rank}, dist.group.WORLD)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip gloo's teardown at interpreter exit (see machine notes)


@pytest.mark.slow
def test_batches_cross_processes_unchanged(tmp_path):
    out = tmp_path / "received.pkl"
    spawn(_worker, args=(str(out),), nprocs=2, timeout=120)
    first, second, gathered = pickle.loads(out.read_bytes())
    torch.manual_seed(0)
    assert_same(sample_batch(), first)
    assert second == {"second": ["x"]}
    assert gathered == [{"rank": 0}, {"rank": 1}]

"""The GPU tier (``make gpu-check``; skipped without CUDA): NCCL, device memory, offload.

These run the CUDA paths that the CPU suite covers with gloo and host memory: the tensor
GATHER over NCCL (received tensors on this rank's device), offload's device-memory round
trip (memory freed, the same bytes back) and, with two GPUs, point-to-point batches over
NCCL received in the order sent (every message has tag 0, which NCCL ignores anyway).
"""

import os
import pickle
import zlib
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from spmd import spawn

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytestmark = [pytest.mark.gpu, pytest.mark.skip(reason="needs a CUDA device")]


def init_nccl(rank: int, world_size: int, port: int) -> None:
    """As ``spmd.init_gloo``, with NCCL as the default group (as ``DistComm`` on GPUs)."""
    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("nccl", store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))  # fmt: skip


def _nccl_gather_worker(rank: int, port: int, out: str) -> None:
    init_nccl(rank, 1, port)
    from flowgraph.runtime.transport import all_gather_batches

    group = dist.new_group([0])
    batch = {"x": torch.arange(6, device="cuda").view(2, 3), "t": ["a", "b"]}
    got = all_gather_batches({0: batch}, group, torch.device("cuda", 0))
    with open(out, "wb") as f:
        pickle.dump({"device": str(got[0]["x"].device), "x": got[0]["x"].cpu()}, f)
    dist.destroy_process_group()
    os._exit(0)


def test_gather_over_nccl_keeps_tensors_on_this_ranks_device(tmp_path):
    out = str(tmp_path / "gathered.pkl")
    spawn(_nccl_gather_worker, args=(out,), nprocs=1, timeout=120)
    with open(out, "rb") as f:
        result = pickle.load(f)
    assert result["device"] == "cuda:0"
    assert torch.equal(result["x"], torch.arange(6).view(2, 3))


def test_offload_frees_device_memory_and_brings_back_the_same_bytes():
    from flowgraph import TorchModule
    from flowgraph.runtime.offload import Offload

    class Big(TorchModule):
        def setup(self):
            self.model = torch.nn.Linear(4096, 4096, device="cuda")
            self.optimizer = torch.optim.AdamW(self.model.parameters())
            self.model(torch.randn(8, 4096, device="cuda")).sum().backward()
            self.optimizer.step()

    module = Big("big")
    module.setup()
    tensors = [module.model.weight, module.model.bias]
    before = [zlib.crc32(t.detach().cpu().numpy().tobytes()) for t in tensors]
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    offload = Offload(module)
    offload.free()
    freed = torch.cuda.memory_allocated()
    offload.load()
    after = [zlib.crc32(t.detach().cpu().numpy().tobytes()) for t in tensors]
    print(f"device memory: {resident / 2**20:.1f} MiB resident, {freed / 2**20:.1f} MiB offloaded")
    assert freed < resident - 3 * 4096 * 4096 * 4  # weights, gradients and two Adam moments
    assert module.model.weight.device.type == "cuda" and after == before


def _nccl_transfer_worker(rank: int, port: int, out: str) -> None:
    """Two ranks over NCCL: rank 0 sends two batches (tag 0, as always), rank 1 receives
    them in order; then both gather each other's batches."""
    init_nccl(rank, 2, port)
    from flowgraph.runtime.comm import DistComm

    device = torch.device("cuda", rank)
    comm = DistComm(rank, 2, rank, 2, device)
    comm.new_groups([(0, 1)])
    first = {"x": torch.arange(4, device=device), "t": ["a"] * 4}
    second = {"x": torch.arange(4, 8, device=device).float(), "t": ["b"] * 4}
    result = {}
    if rank == 0:
        comm.send(first, 1)
        comm.send(second, 1)
        comm.wait_sends()
    else:
        result["received"] = [comm.recv(0) for _ in range(2)]
    gathered = comm.gather({rank: {"r": torch.full((2,), rank, device=device)}}, (0, 1))
    result["gathered"] = {k: (str(v["r"].device), v["r"].cpu()) for k, v in gathered.items()}
    if "received" in result:
        result["received"] = [{k: v.cpu() if torch.is_tensor(v) else v for k, v in b.items()}
                              for b in result["received"]]  # fmt: skip
    with open(f"{out}.{rank}", "wb") as f:
        pickle.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_ranks_over_nccl_receive_in_order_and_gather_on_their_own_device(tmp_path):
    out = str(tmp_path / "nccl")
    spawn(_nccl_transfer_worker, args=(out,), nprocs=2, timeout=180)
    results = []
    for rank in range(2):
        with open(f"{out}.{rank}", "rb") as f:
            results.append(pickle.load(f))
    first, second = results[1]["received"]
    assert torch.equal(first["x"], torch.arange(4)) and first["t"] == ["a"] * 4
    assert torch.equal(second["x"], torch.arange(4, 8).float()) and second["t"] == ["b"] * 4
    for rank, result in enumerate(results):
        devices = {device for device, _ in result["gathered"].values()}
        assert devices == {f"cuda:{rank}"}
        assert [int(v[0]) for _, v in sorted(result["gathered"].items())] == [0, 1]

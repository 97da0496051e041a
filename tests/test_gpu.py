"""The GPU tier (``make gpu-check``; skipped without CUDA): NCCL, device memory, offload.

These run the CUDA paths that the CPU suite covers with gloo and host memory: the tensor
GATHER over NCCL (received tensors on this rank's device) and offload's device-memory
round trip (memory freed, the same bytes back).
"""

import os
import pickle
import zlib

import pytest
import torch
import torch.distributed as dist

from spmd import init_gloo, spawn

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytestmark = [pytest.mark.gpu, pytest.mark.skip(reason="needs a CUDA device")]


def _nccl_gather_worker(rank: int, port: int, out: str) -> None:
    init_gloo(rank, 1, port)  # the store and a default group; NCCL for the gathered group
    from flowgraph.runtime.transport import all_gather_batches

    torch.cuda.set_device(0)
    group = dist.new_group([0], backend="nccl")
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

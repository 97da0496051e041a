"""Batches between ranks: metadata first, then every tensor's bytes in one buffer.

A batch (``dict[str, Tensor | list]``) travels as three messages with one tag: the
metadata length, the pickled metadata (keys, dtypes, shapes, and non-tensor values such
as lists of strings), then one ``uint8`` buffer holding every tensor's bytes. Any dtype
travels (bf16 and bool included) because the wire format is raw bytes. Sends are
asynchronous: ``Outbox.wait()`` completes them.

Example::

    outbox = Outbox()
    outbox.send({"ids": torch.arange(4), "text": ["a", "b", "c", "d"]}, dst=1, tag=7)
    outbox.wait()
    batch = recv_batch(src=0, tag=7)          # on rank 1
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist


def pack(batch: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(metadata bytes, tensor bytes)`` of a batch."""
    entries, buffers, offset = [], [], 0
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            raw = value.detach().contiguous().reshape(-1).view(torch.uint8)
            entries.append(
                (key, "tensor", str(value.dtype), tuple(value.shape), offset, raw.numel())
            )
            buffers.append(raw.to(device))
            offset += raw.numel()
        else:
            entries.append((key, "object", value))
    meta = torch.frombuffer(bytearray(pickle.dumps(entries)), dtype=torch.uint8).to(device)
    data = torch.cat(buffers) if buffers else torch.empty(0, dtype=torch.uint8, device=device)
    return meta, data


def unpack(meta: torch.Tensor, data: torch.Tensor) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    for entry in pickle.loads(meta.cpu().numpy().tobytes()):
        key, kind = entry[0], entry[1]
        if kind == "object":
            batch[key] = entry[2]
            continue
        _, _, dtype, shape, offset, size = entry
        raw = data[offset : offset + size].clone()
        batch[key] = raw.view(getattr(torch, dtype.removeprefix("torch."))).reshape(shape)
    return batch


class Outbox:
    """Asynchronous sends whose buffers stay alive until ``wait()``."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.pending: list[tuple[object, torch.Tensor]] = []

    def send(self, batch: Mapping[str, Any], dst: int, tag: int) -> None:
        meta, data = pack(batch, self.device)
        sizes = torch.tensor([meta.numel(), data.numel()], dtype=torch.int64, device=self.device)
        for tensor in (sizes, meta, data):
            if tensor.numel():  # an empty message is skipped on both sides
                self.pending.append((dist.isend(tensor, dst, tag=tag), tensor))

    def wait(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


def recv_batch(src: int, tag: int, device: torch.device | None = None) -> dict[str, Any]:
    """The next batch ``src`` sent with ``tag`` (blocks until it arrives)."""
    device = device or torch.device("cpu")
    sizes = torch.empty(2, dtype=torch.int64, device=device)
    dist.recv(sizes, src, tag=tag)
    meta = torch.empty(int(sizes[0]), dtype=torch.uint8, device=device)
    dist.recv(meta, src, tag=tag)
    data = torch.empty(int(sizes[1]), dtype=torch.uint8, device=device)
    if data.numel():
        dist.recv(data, src, tag=tag)
    return unpack(meta, data)


def all_gather_objects(obj: Any, group: object | None) -> list[Any]:
    """Every member's ``obj``, in group rank order (just ``[obj]`` without a group)."""
    if group is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out

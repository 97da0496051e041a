"""Batches between ranks: metadata first, then every tensor's bytes in one buffer.

A batch (``dict[str, Tensor | list]``) travels as messages with one tag: a 4 KiB header
with the length and start of the pickled metadata (keys, dtypes, shapes, and non-tensor
values such as lists of strings), the rest of the metadata when it is longer, then each
tensor's bytes, sent from and received into the tensors
themselves (no packing copy). Any dtype travels (bf16 and bool included) because the
wire format is raw bytes. Sends are asynchronous: ``Outbox.wait()`` completes them.

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

HEADER_BYTES = 4096


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A ``uint8`` view of a tensor's data (a copy only when it is not contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def pack(batch: Mapping[str, Any]) -> tuple[bytes, list[torch.Tensor]]:
    """``(metadata, tensors)`` of a batch: the metadata pickles keys, dtypes, shapes and
    every non-tensor value; tensors travel as they are."""
    entries, tensors = [], []
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            entries.append(
                (key, "tensor", str(value.dtype).removeprefix("torch."), tuple(value.shape))
            )
            tensors.append(value)
        else:
            entries.append((key, "object", value))
    return pickle.dumps(entries), tensors


def unpack(meta: bytes, receive: Any) -> dict[str, Any]:
    """Rebuild a batch; ``receive(empty_tensor)`` fills each tensor in order."""
    batch: dict[str, Any] = {}
    for entry in pickle.loads(meta):
        key, kind = entry[0], entry[1]
        if kind == "object":
            batch[key] = entry[2]
        else:
            batch[key] = receive(torch.empty(entry[3], dtype=getattr(torch, entry[2])))
    return batch


class Outbox:
    """Asynchronous sends whose buffers stay alive until ``wait()``."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.pending: list[tuple[object, torch.Tensor]] = []

    def send(self, batch: Mapping[str, Any], dst: int, tag: int) -> None:
        meta, tensors = pack(batch)
        head, rest = _header(meta)
        payload = [head.to(self.device), rest.to(self.device)]
        payload += [_as_bytes(t.to(self.device)) for t in tensors]
        for message in payload:
            if message.numel():  # an empty tensor is not sent; the receiver skips it too
                self.pending.append((dist.isend(message, dst, tag=tag), message))

    def wait(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


def recv_batch(src: int, tag: int, device: torch.device | None = None) -> dict[str, Any]:
    """The next batch ``src`` sent with ``tag`` (blocks until it arrives)."""
    device = device or torch.device("cpu")
    head = torch.empty(HEADER_BYTES, dtype=torch.uint8, device=device)
    dist.recv(head, src, tag=tag)
    head = head.cpu()
    length = int(head[:8].view(torch.int64)[0])
    meta = head[8 : 8 + length]
    if length > HEADER_BYTES - 8:
        rest = torch.empty(length - (HEADER_BYTES - 8), dtype=torch.uint8, device=device)
        dist.recv(rest, src, tag=tag)
        meta = torch.cat([meta, rest.cpu()])

    def receive(empty: torch.Tensor) -> torch.Tensor:
        tensor = empty.to(device)
        if tensor.numel():
            dist.recv(_as_bytes(tensor), src, tag=tag)  # fills ``tensor`` in place
        return tensor

    return unpack(meta.numpy().tobytes(), receive)


def _header(meta: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed-size first message (length + the start of the metadata) and the rest, so
    that a small batch's metadata costs one message, not a size exchange and a payload."""
    data = torch.frombuffer(bytearray(len(meta).to_bytes(8, "little") + meta), dtype=torch.uint8)
    head = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    head[: min(HEADER_BYTES, data.numel())] = data[:HEADER_BYTES]
    return head, data[HEADER_BYTES:]


def all_gather_objects(obj: Any, group: object | None) -> list[Any]:
    """Every member's ``obj``, in group rank order (just ``[obj]`` without a group)."""
    if group is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out

"""Batches between ranks: metadata first, then every tensor's bytes.

Point to point, a batch (``dict[str, Tensor | list]``) travels as messages: a 4 KiB
header with the length and start of the pickled metadata (keys, dtypes, shapes, and
non-tensor values such as lists of strings), the rest of the metadata when it is longer,
then each tensor's bytes, sent from and received into the tensors themselves (no packing
copy). Messages carry no meaning in their tags: NCCL ignores tags and matches the
messages between two ranks in order, so the plan orders every pair's sends and receives
alike and the transport sends everything with tag 0. Any dtype travels (bf16 and bool
included) because the wire format is raw bytes. Sends are asynchronous: ``Outbox.wait()``
completes them.

``all_gather_batches`` collects many batches from every member of a group in two
collectives: the sizes, then one buffer per member holding its pickled metadata and its
tensors' bytes (not pickled tensors: ``all_gather_object`` copies every tensor through
pickle, and on NCCL returns them on the sender's device index).

Example::

    outbox = Outbox()
    outbox.send({"ids": torch.arange(4), "text": ["a", "b", "c", "d"]}, dst=1)
    outbox.wait()
    batch = recv_batch(src=0)                 # on rank 1
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

HEADER_BYTES = 4096
ALIGN = 16  # bytes: every tensor starts at an offset that any dtype can be viewed at


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

    def send(self, batch: Mapping[str, Any], dst: int, tag: int = 0) -> None:
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


def recv_batch(src: int, tag: int = 0, device: torch.device | None = None) -> dict[str, Any]:
    """The next batch ``src`` sent (blocks until it arrives)."""
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


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _pack_many(batches: Mapping[int, Mapping[str, Any]]) -> tuple[bytes, list[torch.Tensor]]:
    entries, tensors = [], []
    for index, batch in batches.items():
        meta, batch_tensors = pack(batch)
        entries.append((index, meta))
        tensors += batch_tensors
    return pickle.dumps(entries), tensors


def all_gather_batches(
    batches: Mapping[int, Mapping[str, Any]], group: object, device: torch.device | None = None
) -> dict[int, dict[str, Any]]:
    """Every member's ``batches`` (keyed by micro-batch index), merged, on every member.

    Each member's metadata and tensor bytes travel in one buffer (tensors at aligned
    offsets); received tensors are views into the received buffer, not copies.
    """
    device = device or torch.device("cpu")
    meta, tensors = _pack_many(batches)
    offsets, end = [], _aligned(len(meta))
    for t in tensors:
        offsets.append(end)
        end = _aligned(end + t.numel() * t.element_size())
    sizes = torch.tensor([len(meta), end], dtype=torch.int64, device=device)
    members = dist.get_world_size(group)
    all_sizes = [torch.empty_like(sizes) for _ in range(members)]
    dist.all_gather(all_sizes, sizes, group=group)
    longest = max(int(s[1]) for s in all_sizes)
    buffer = torch.zeros(longest, dtype=torch.uint8, device=device)
    buffer[: len(meta)] = torch.frombuffer(bytearray(meta), dtype=torch.uint8).to(device)
    for t, offset in zip(tensors, offsets, strict=True):
        raw = _as_bytes(t.to(device))
        buffer[offset : offset + raw.numel()] = raw
    received = [torch.empty_like(buffer) for _ in range(members)]
    dist.all_gather(received, buffer, group=group)
    merged: dict[int, dict[str, Any]] = {}
    for member, (data, size) in enumerate(zip(received, all_sizes, strict=True)):
        if member == dist.get_rank(group):
            merged.update({k: dict(v) for k, v in batches.items()})
            continue
        merged.update(_unpack_many(data, int(size[0])))
    return merged


def _unpack_many(data: torch.Tensor, meta_length: int) -> dict[int, dict[str, Any]]:
    entries = pickle.loads(data[:meta_length].cpu().numpy().tobytes())
    position = [_aligned(meta_length)]

    def receive(empty: torch.Tensor) -> torch.Tensor:
        n = empty.numel() * empty.element_size()
        start = position[0]
        position[0] = _aligned(start + n)
        return data[start : start + n].view(empty.dtype).reshape(empty.shape)

    return {index: unpack(meta, receive) for index, meta in entries}

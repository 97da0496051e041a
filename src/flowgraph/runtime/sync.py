"""Parameter sync between a trainer and its inference copy on the same process.

A ``SyncPlan`` is computed once (after ``setup()``, before the first episode): it pairs
every destination tensor with its source tensor through ``dst.map_sync_name`` and
rejects missing, extra or mismatched parameters, listing all of them. ``apply()`` then
copies in place, so no second copy of the model is ever allocated. A destination of
another floating-point dtype (a bf16 inference copy of an fp32 trainer) receives the cast
of its source, made once, in place (``copy_``); across ranks the sender casts before
sending.

Example::

    >>> class Net(TorchModule):
    ...     def setup(self):
    ...         self.model = torch.nn.Linear(30, 40)
    >>> ppo_policy, policy = Net("ppo_policy"), Net("policy")
    >>> ppo_policy.setup(); policy.setup()
    >>> plan = SyncPlan.build(ppo_policy, policy)
    >>> print(plan)
    sync ppo_policy -> policy: 2 tensors, 1,240 parameters
    >>> plan.apply()
    >>> torch.equal(policy.model.weight, ppo_policy.model.weight)
    True
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from flowgraph.errors import ParameterSyncError
from flowgraph.module import BaseModule, TorchModule
from flowgraph.precision import hosted_dtype


def check_torch_modules(src: BaseModule, dst: BaseModule) -> None:
    for module in (src, dst):
        if not isinstance(module, TorchModule):
            raise ParameterSyncError(
                f"set_parameter_sync({src.name}, {dst.name}): {module!r} is a "
                f"{type(module).__name__}, not a TorchModule; parameter sync copies "
                "self.model parameters, so both sides must be TorchModules"
            )


def match_parameters(
    src: BaseModule,
    dst: BaseModule,
    src_params: Mapping[str, torch.Tensor],
    dst_params: Mapping[str, torch.Tensor],
) -> list[tuple[str, str]]:
    """``(src_name, dst_name)`` pairs in source order, through ``dst.map_sync_name``.

    Works on real or meta tensors. Missing, extra or mismatched parameters raise one
    ``ParameterSyncError`` that lists all of them.
    """
    pairs, problems, claimed = [], [], set()
    for src_name, src_tensor in src_params.items():
        dst_name = dst.map_sync_name(src_name)
        if dst_name is None:
            continue
        dst_tensor = dst_params.get(dst_name)
        if dst_tensor is None:
            problems.append(f"{src_name}: no parameter {dst_name!r} in {dst.name}")
            continue
        claimed.add(dst_name)
        if full_shape(src_tensor) != full_shape(dst_tensor) or not _castable(
            src_tensor.dtype, dst_tensor.dtype
        ):
            problems.append(
                f"{src_name} -> {dst_name}: {_describe(src_tensor)} vs {_describe(dst_tensor)}"
            )
            continue
        pairs.append((src_name, dst_name))
    for dst_name in dst_params.keys() - claimed:
        problems.append(f"{dst_name}: in {dst.name} but receives nothing from {src.name}")
    if problems:
        listed = "\n  ".join(sorted(problems))
        raise ParameterSyncError(
            f"set_parameter_sync({src.name}, {dst.name}): parameters do not match:\n"
            f"  {listed}\nBuild both models with the same architecture, or override "
            f"{type(dst).__name__}.map_sync_name(src_name) to rename parameters "
            "(return None to skip one)"
        )
    return pairs


def _castable(src: torch.dtype, dst: torch.dtype) -> bool:
    """Same dtype, or two floating-point ones (the sync casts)."""
    return src == dst or (src.is_floating_point and dst.is_floating_point)


@dataclass
class SyncPlan:
    """Pairs of (source, destination) tensors copied by one ``set_parameter_sync``."""

    src: str
    dst: str
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    names: list[tuple[str, str]] = field(default_factory=list)
    buckets: list[list[int]] = field(default_factory=list)

    @classmethod
    def build(cls, src: BaseModule, dst: BaseModule, bucket_bytes: int = 256 * 2**20) -> SyncPlan:
        """Pair the live parameters of two modules set up in this process; copies go in
        buckets of ``bucket_bytes`` (the unit a ZeRO-3 source is gathered in)."""
        check_torch_modules(src, dst)
        src_params = dict(src.sync_parameters())
        dst_params = dict(dst.sync_parameters())
        names = match_parameters(src, dst, src_params, dst_params)
        pairs = [(src_params[s], dst_params[d]) for s, d in names]
        sizes = [nbytes(s) for s, _ in pairs]
        count = max(1, math.ceil(sum(sizes) / bucket_bytes))
        return cls(src.name, dst.name, pairs, names, _partition(sizes, count))

    def apply(self) -> None:
        """Copy every source tensor into its destination, in place."""
        with torch.no_grad():
            for bucket in self.buckets:
                sources = [self.pairs[i][0] for i in bucket]
                with gathered(sources):
                    for i in bucket:
                        self.pairs[i][1].copy_(self.pairs[i][0])

    def validate(self) -> None:
        """``validate_sync``: raise ``ParameterSyncError`` naming destination tensors whose
        checksum differs from their source's."""
        dtypes = [d.dtype for _, d in self.pairs]
        src_sums = checksums([s for s, _ in self.pairs], self.buckets, dtypes)
        dst_sums = checksums([d for _, d in self.pairs], self.buckets)
        _raise_if_differ(self.src, self.dst, self.names, src_sums, [dst_sums])

    @property
    def numel(self) -> int:
        return sum(math.prod(full_shape(s)) for s, _ in self.pairs)

    def __str__(self) -> str:
        return (
            f"sync {self.src} -> {self.dst}: {len(self.pairs)} tensors, {self.numel:,} parameters"
        )


def _describe(tensor: torch.Tensor) -> str:
    return f"{tuple(full_shape(tensor))} {str(tensor.dtype).removeprefix('torch.')}"


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """A parameter's shape, also for a ZeRO-3 shard (whose full shape is ``ds_shape``)."""
    return getattr(tensor, "ds_shape", tensor.shape)


def nbytes(tensor: torch.Tensor) -> int:
    return math.prod(full_shape(tensor)) * tensor.element_size()


@contextlib.contextmanager
def gathered(tensors: list[torch.Tensor]) -> Iterator[None]:
    """Inside: full values of ZeRO-3 shards (every rank of their mesh must enter)."""
    if not any(hasattr(t, "ds_shape") for t in tensors):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(tensors, modifier_rank=None):
        yield


class CrossSync:
    """Weights of ``src`` broadcast bucket by bucket to ``dst`` on other ranks.

    Both sides agree on the tensor order (the source's parameter order) and on the bucket
    boundaries without talking: the shapes of the side that is not local come from running
    its ``setup()`` on the meta device. Bucket ``b`` is sent by source rank
    ``src_ranks[b % len(src_ranks)]`` (every source rank holds the same weights), so no
    single rank sends them all. The destination's dtypes (``dst_precision`` for an
    inference copy set up elsewhere) are what travels: the sender casts.
    """

    def __init__(
        self,
        src: BaseModule,
        dst: BaseModule,
        buckets: int,
        rank: int,
        src_ranks: tuple[int, ...],
        dst_ranks: tuple[int, ...],
        dst_precision: str = "fp32",
    ) -> None:
        check_torch_modules(src, dst)
        self.src, self.dst = src.name, dst.name
        self.rank, self.src_ranks = rank, src_ranks
        self.sends = rank in src_ranks
        src_params = dict(src.sync_parameters()) if self.sends else src.meta_parameters()
        dst_params = dict(dst.sync_parameters()) if rank in dst_ranks else dst.meta_parameters()
        self.names = match_parameters(src, dst, src_params, dst_params)
        local = src_params if self.sends else dst_params
        self.tensors = [local[s if self.sends else d] for s, d in self.names]
        self.dtypes = [
            dst_params[d].dtype
            if rank in dst_ranks
            else hosted_dtype(dst_params[d].dtype, dst_precision, dst.trainable)
            for _, d in self.names
        ]
        sizes = [nbytes(src_params[s]) for s, _ in self.names]
        self.buckets = _partition(sizes, buckets)

    def root(self, bucket: int) -> int:
        return self.src_ranks[bucket % len(self.src_ranks)]

    def broadcast(self, bucket: int, group: object) -> None:
        """Send (on the bucket's root) or receive bucket ``bucket`` into place.

        ``group`` holds the bucket's root and the destination ranks only; other source
        ranks just take part in gathering ZeRO-3 shards. Tensors of ``DIRECT_BYTES`` or
        more travel straight from the source parameter into the destination parameter;
        smaller ones share one flat buffer.
        """
        indices = self.buckets[bucket]
        tensors = [self.tensors[i] for i in indices]
        if not tensors:
            return
        root = self.root(bucket)
        if self.sends:
            with gathered(tensors):  # ZeRO-3: this bucket only, on every source rank
                if self.rank == root:
                    cast = [_as(t, self.dtypes[i]) for i, t in zip(indices, tensors, strict=True)]
                    _broadcast_tensors(cast, root, group, receive=False)
            return
        with torch.no_grad():
            _broadcast_tensors(tensors, root, group, receive=True)

    def validate(self, group: object) -> None:
        """Compare checksums of every source and destination tensor (``validate_sync``);
        raise ``ParameterSyncError`` naming the parameters that differ."""
        mine = (self.sends, checksums(self.tensors, self.buckets, self.dtypes))
        parts: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, mine, group=group)
        expected = next(sums for sends, sums in parts if sends)
        received = [sums for sends, sums in parts if not sends]
        _raise_if_differ(self.src, self.dst, self.names, expected, received)


DIRECT_BYTES = 4 * 2**20


def _broadcast_tensors(
    tensors: list[torch.Tensor], root: int, group: object, receive: bool
) -> None:
    """Broadcast ``tensors`` from ``root``: large contiguous ones in place and
    asynchronously, the small ones packed into one buffer."""
    direct = [t for t in tensors if nbytes(t) >= DIRECT_BYTES and t.is_contiguous()]
    small = [t for t in tensors if not any(t is d for d in direct)]
    works = [
        dist.broadcast(t.detach().view(-1).view(torch.uint8), src=root, group=group, async_op=True)
        for t in direct
    ]
    if small:
        if receive:
            flat = torch.empty(sum(nbytes(t) for t in small), dtype=torch.uint8,
                               device=small[0].device)  # fmt: skip
        else:
            flat = torch.cat([t.detach().reshape(-1).view(torch.uint8) for t in small])
        dist.broadcast(flat, src=root, group=group)
        if receive:
            offset = 0
            for t in small:
                n = nbytes(t)
                t.copy_(flat[offset : offset + n].view(t.dtype).reshape(t.shape))
                offset += n
    for work in works:
        work.wait()


def _raise_if_differ(
    src: str,
    dst: str,
    names: list[tuple[str, str]],
    expected: list[int],
    received: list[list[int]],
) -> None:
    differing = sorted({
        f"{s} -> {d}"
        for sums in received
        for (s, d), want, got in zip(names, expected, sums, strict=True)
        if want != got
    })  # fmt: skip
    if differing:
        raise ParameterSyncError(
            f"validate_sync: after sync {src} -> {dst}, these parameters differ between "
            f"source and destination: {', '.join(differing)}"
        )


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.detach() if tensor.dtype == dtype else tensor.detach().to(dtype)


def checksums(
    tensors: list[torch.Tensor],
    buckets: list[list[int]] | None = None,
    dtypes: list[torch.dtype] | None = None,
) -> list[int]:
    """A CRC32 of every tensor's bytes (exact: one flipped bit changes it), gathering
    ZeRO-3 shards bucket by bucket; of its cast to ``dtypes[i]`` when given (what a sync
    into a lower-precision copy must produce)."""
    sums = [0] * len(tensors)
    for bucket in buckets or [list(range(len(tensors)))]:
        members = [tensors[i] for i in bucket]
        with gathered(members):
            for i, t in zip(bucket, members, strict=True):
                value = _as(t, dtypes[i]) if dtypes else t.detach()
                raw = value.cpu().contiguous().reshape(-1).view(torch.uint8)
                sums[i] = zlib.crc32(raw.numpy())
    return sums


def _partition(sizes: list[int], buckets: int) -> list[list[int]]:
    """Indices of ``sizes`` cut into ``buckets`` contiguous runs of about equal bytes."""
    total = sum(sizes) or 1
    out: list[list[int]] = [[] for _ in range(buckets)]
    running = 0
    for i, size in enumerate(sizes):
        out[min(buckets - 1, running * buckets // total)].append(i)
        running += size
    return out

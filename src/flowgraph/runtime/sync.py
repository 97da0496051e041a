"""Parameter sync between a trainer and its inference copy on the same process.

A ``SyncPlan`` is computed once (after ``setup()``, before the first episode): it pairs
every destination tensor with its source tensor through ``dst.map_sync_name`` and
rejects missing, extra or mismatched parameters, listing all of them. ``apply()`` then
copies in place, so no second copy of the model is ever allocated.

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

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from flowgraph.errors import ParameterSyncError
from flowgraph.module import BaseModule, TorchModule


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
        if src_tensor.shape != dst_tensor.shape or src_tensor.dtype != dst_tensor.dtype:
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


@dataclass
class SyncPlan:
    """Pairs of (source, destination) tensors copied by one ``set_parameter_sync``."""

    src: str
    dst: str
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @classmethod
    def build(cls, src: BaseModule, dst: BaseModule) -> SyncPlan:
        """Pair the live parameters of two modules set up in this process."""
        check_torch_modules(src, dst)
        src_params = dict(src.sync_parameters())
        dst_params = dict(dst.sync_parameters())
        names = match_parameters(src, dst, src_params, dst_params)
        return cls(src.name, dst.name, [(src_params[s], dst_params[d]) for s, d in names])

    def apply(self) -> None:
        """Copy every source tensor into its destination, in place."""
        with torch.no_grad():
            for src_tensor, dst_tensor in self.pairs:
                dst_tensor.copy_(src_tensor)

    @property
    def numel(self) -> int:
        return sum(s.numel() for s, _ in self.pairs)

    def __str__(self) -> str:
        return (
            f"sync {self.src} -> {self.dst}: {len(self.pairs)} tensors, {self.numel:,} parameters"
        )


def _describe(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"

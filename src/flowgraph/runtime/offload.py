"""Offload: a model's device memory moves to host memory between its stages.

With ``models.<name>.offload: true`` a colocated model gives its device memory back while
the other models on its ranks run: its weights, gradients, buffers and optimizer states
move to host memory (pinned, so the way back is a fast asynchronous copy) after its last
instruction of a phase (``FREE``) and come back before its first instruction of the next
phase that uses it (``LOAD``). Every tensor keeps its identity (only its ``.data`` moves),
so optimizers, DDP and sync plans that hold references stay valid.

A ``DeepSpeedModule`` hands the same job to DeepSpeed (``engine.offload_states()`` /
``engine.reload_states()``), which knows where its ZeRO partitions live.

Cost: two copies of (weights + gradients + optimizer states) per phase over the host
link, about 25 GB/s on PCIe 5 (``compiler/cost.py`` charges it to ``FREE``/``LOAD``). On a
CPU-only machine host and device are the same memory and nothing moves.

Example::

    >>> import torch
    >>> from flowgraph import TorchModule
    >>> class Tiny(TorchModule):
    ...     def setup(self):
    ...         self.model = torch.nn.Linear(2, 2)
    >>> tiny = Tiny("tiny"); tiny.setup()
    >>> offload = Offload(tiny)
    >>> offload.free(); offload.load()
    >>> print(offload)
    Offload(tiny: 24 B per move, 1 free, 1 load)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from flowgraph.module import BaseModule, DeepSpeedModule


class Offload:
    """Moves one module's tensors between its device and ``host`` (CPU by default)."""

    def __init__(self, module: BaseModule, host: torch.device | str = "cpu") -> None:
        self.module = module
        self.host = torch.device(host)
        self.device: torch.device | None = None
        self.resident = True
        self.bytes_moved = 0
        self.frees = self.loads = 0

    def free(self) -> None:
        """Move the module's device memory to the host (no-op when already there)."""
        if not self.resident:
            return
        engine = getattr(self.module, "engine", None)
        if isinstance(self.module, DeepSpeedModule) and engine is not None:
            if self._engine_device(engine).type != "cpu":
                engine.offload_states(non_blocking=True)
        else:
            self.device = self.device or self._first_device()
            self.bytes_moved = self._move_all(self.host, pin=self.device.type == "cuda")
        self.resident = False
        self.frees += 1

    def load(self) -> None:
        """Bring the module's tensors back to its device before its next stage."""
        if self.resident:
            return
        engine = getattr(self.module, "engine", None)
        if isinstance(self.module, DeepSpeedModule) and engine is not None:
            if self._engine_device(engine).type != "cpu":
                engine.reload_states(non_blocking=True)
        elif self.device is not None:
            self._move_all(self.device, pin=False)
        self.resident = True
        self.loads += 1

    def __str__(self) -> str:
        return (
            f"Offload({self.module.name}: {self.bytes_moved} B per move, "
            f"{self.frees} free, {self.loads} load)"
        )

    __repr__ = __str__

    # -- moving --------------------------------------------------------------------------
    def _move_all(self, device: torch.device, pin: bool) -> int:
        moved = 0
        for tensor in self._tensors():
            target = tensor.data.to(device, non_blocking=True)
            if pin and target.device.type == "cpu" and not target.is_pinned():
                target = target.pin_memory()
            tensor.data = target  # identity kept: optimizers, DDP and syncs hold references
            moved += target.numel() * target.element_size()
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        return moved

    def _tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor the module keeps: parameters and their gradients, buffers,
        optimizer states (their scalar step counters stay where they are)."""
        model = getattr(self.module, "model", None)
        if isinstance(model, torch.nn.Module):
            for param in model.parameters():
                yield param
                if param.grad is not None:
                    yield param.grad
            yield from model.buffers()
        optimizer = getattr(self.module, "optimizer", None)
        if isinstance(optimizer, torch.optim.Optimizer):
            for state in optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.dim() > 0:
                        yield value

    def _first_device(self) -> torch.device:
        model = getattr(self.module, "model", None)
        params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
        return params[0].device if params else self.host

    @staticmethod
    def _engine_device(engine: object) -> torch.device:
        return torch.device(getattr(engine, "device", "cpu"))

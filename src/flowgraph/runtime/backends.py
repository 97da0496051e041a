"""Training backends: how a trainable model is prepared on its mesh after ``setup()``.

- ``TorchModule`` (``backend: torch``): ``self.model`` is wrapped in DDP over the mesh's
  process group when the mesh has more than one rank; ``train_step`` is unchanged.
- ``DeepSpeedModule`` (``backend: deepspeed``): ``self.model`` and ``self.optimizer`` go
  through ``deepspeed.initialize`` on the mesh's group with ``models.<name>.zero_stage``;
  ``train_step`` calls ``self.engine.backward(loss)`` and ``self.engine.step()`` per
  micro-batch. On CPUs DeepSpeed runs over gloo; its shared-memory op, which would
  compile for a minute on first use, is switched off.

Example::

    prepare(module, group=ctx.group(ranks), ranks=ranks, runtime=config.runtime)
"""

from __future__ import annotations

import os
import socket

import torch.distributed as dist

from flowgraph.config import ModelConfig, RuntimeConfig
from flowgraph.devices import cuda_wanted
from flowgraph.errors import ConfigError
from flowgraph.module import BaseModule, DeepSpeedModule, TorchModule


def effective_backend(module: BaseModule, settings: ModelConfig) -> str:
    """``deepspeed`` for a ``DeepSpeedModule``, else the config's backend (checked)."""
    if isinstance(module, DeepSpeedModule):
        return "deepspeed"
    if settings.backend == "deepspeed":
        raise ConfigError(
            f"models.{module.name}.backend: deepspeed needs a DeepSpeedModule, but "
            f"{type(module).__name__} is a {type(module).__mro__[1].__name__}; subclass "
            "flowgraph.DeepSpeedModule (its train_step calls self.engine.backward(loss) and "
            "self.engine.step()), or set backend: torch"
        )
    return "torch"


class _MeshParallelism:
    """What DeepSpeed asks of a model-parallel unit: here, data parallelism on one mesh."""

    def __init__(self, group: object) -> None:
        self.group = group

    def get_data_parallel_group(self):
        return self.group

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.group)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.group)

    def get_model_parallel_group(self):
        return None

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_group = get_model_parallel_group
    get_pipeline_model_parallel_world_size = get_model_parallel_world_size
    get_pipeline_model_parallel_rank = get_model_parallel_rank


def ensure_process_group() -> None:
    """DeepSpeed needs a process group even in one process: make a 1-rank gloo group."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port)}  # fmt: skip
    for key, value in defaults.items():
        os.environ.setdefault(key, value)  # DeepSpeed reads these, as torchrun sets them
    dist.init_process_group("nccl" if cuda_wanted() else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)  # fmt: skip


def prepare(
    module: BaseModule, group: object | None, mesh_size: int, runtime: RuntimeConfig
) -> None:
    """Wrap a trainable module for data parallelism on its mesh (after ``setup()``)."""
    if not isinstance(module, TorchModule) or module.model is None:
        return
    if isinstance(module, DeepSpeedModule):
        _deepspeed(module, group, mesh_size, runtime)
    elif mesh_size > 1:
        _ddp(module, group)


def _ddp(module: TorchModule, group: object) -> None:
    from torch.nn.parallel import DistributedDataParallel

    params = list(module.model.parameters())
    if not params:
        return
    device = params[0].device
    module.model = DistributedDataParallel(
        module.model,
        device_ids=[device.index] if device.type == "cuda" else None,
        process_group=group,
    )


def _deepspeed(module: DeepSpeedModule, group: object | None, mesh_size: int,
               runtime: RuntimeConfig) -> None:  # fmt: skip
    os.environ.setdefault("DS_BUILD_OPS", "0")
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    ensure_process_group()
    if group is None:
        group = dist.new_group([dist.get_rank()])
    config = module.deepspeed_config(mesh_size)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=module.model,
        optimizer=module.optimizer,
        config=config,
        mpu=_MeshParallelism(group),
        dist_init_required=False,
    )
    module.engine, module.model, module.optimizer = engine, engine, optimizer

"""Models as users write them: ``BaseModule`` and ``TorchModule``.

A module is built cheaply on every rank (``__init__`` only stores the name); its heavy
state is created in ``setup()``, which runs once, and only where the plan places it.
Step methods take a dict batch and return a dict batch (``train_step`` takes a list of
micro-batch dicts and may return a metrics dict)::

    class PolicyInference(TorchModule):
        def setup(self):
            self.model = torch.nn.Linear(4, 1)
        def forward_step(self, data):
            return {**data, "action": self.model(data["x"])}

    policy = PolicyInference("policy")      # configured under models.policy

Inside a flow being traced, calling a public method with a batch records a graph node
instead of running it (see ``flowgraph.compiler.trace``); outside tracing the method runs
as written. The tracer registers itself with ``recording(tracer)``; this file never imports
the compiler.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import inspect
import re
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from flowgraph.config import Config, ModelConfig, RuntimeConfig, current_config
from flowgraph.errors import EngineError, FlowgraphError, PlanError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
# Public methods of the framework's own API: never recorded as model calls.
_NOT_RECORDED = frozenset(
    {
        "setup",
        "map_sync_name",
        "missing_step_method",
        "sync_parameters",
        "parameter_count",
        "deepspeed_config",
        "checkpoint_state",
        "load_checkpoint_state",
        "meta_parameters",
        "measure_params",
    }
)


class Recorder(Protocol):
    """What ``recording`` installs: the tracer of the flow being traced."""

    def intercepts(self, method: str, args: tuple, kwargs: dict) -> bool: ...

    def record_call(self, module: BaseModule, method: str, args: tuple, kwargs: dict) -> Any: ...


# The recorder (tracer) of the flow being traced right now, or None: module methods consult it.
_recorder: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar(
    "flowgraph_recorder", default=None
)


@contextlib.contextmanager
def recording(recorder: Recorder | None) -> Iterator[None]:
    """Route recordable module calls to ``recorder`` inside the ``with`` block.

    Example::

        >>> class Echo(BaseModule):
        ...     def forward_step(self, data):
        ...         return data
        >>> class Log:
        ...     def intercepts(self, method, args, kwargs):
        ...         return True
        ...     def record_call(self, module, method, args, kwargs):
        ...         return f"recorded {module.name}.{method}"
        >>> with recording(Log()):
        ...     Echo("echo").forward_step({"x": 1})
        'recorded echo.forward_step'
        >>> Echo("echo").forward_step({"x": 1})
        {'x': 1}
    """
    token = _recorder.set(recorder)
    try:
        yield
    finally:
        _recorder.reset(token)


def _recordable(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a module method so that a traced flow records it instead of running it."""
    if getattr(method, "__flowgraph_recordable__", False):
        return method
    name = method.__name__
    current = _recorder.get

    @functools.wraps(method)
    def call(self: BaseModule, *args: Any, **kwargs: Any) -> Any:
        tracer = current()
        if tracer is not None and tracer.intercepts(name, args, kwargs):
            return tracer.record_call(self, name, args, kwargs)
        return method(self, *args, **kwargs)

    call.__flowgraph_recordable__ = True  # type: ignore[attr-defined]
    return call


class BaseModule:
    """A model of a flow, named so that ``models.<name>`` in the config configures it.

    Subclasses define ``setup()`` and any of ``forward_step(data)``,
    ``train_step(micro_batches)``, ``eval_step(data)`` (default: ``forward_step``).

    Example::

        >>> class Doubler(BaseModule):
        ...     def forward_step(self, data):
        ...         return {"y": [2 * v for v in data["x"]]}
        >>> Doubler("doubler").forward_step({"x": [1, 2]})
        {'y': [2, 4]}
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for attr, value in list(vars(cls).items()):
            if inspect.isfunction(value) and not attr.startswith("_") and attr not in _NOT_RECORDED:
                setattr(cls, attr, _recordable(value))

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise EngineError(
                f"{type(self).__name__}({name!r}): a module name must be a non-empty "
                "identifier (letters, digits, '_' or '-', not starting with a digit) since "
                "it is the config key models.<name>"
            )
        self.name = name
        self.config: Config | None = None  # set by the Engine before setup()
        self.trainable = False  # set by the Engine: a Trainer flow calls this module

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    @property
    def model_config(self) -> ModelConfig:
        """This model's ``models.<name>`` section (free-form settings in ``.args``)."""
        return (self.config or current_config()).model(self.name)

    @property
    def runtime_config(self) -> RuntimeConfig:
        """The run's ``runtime`` section."""
        return (self.config or current_config()).runtime

    def setup(self) -> None:
        """Build the model (weights, optimizer). Runs once, on the ranks hosting it."""

    def forward_step(self, data: dict[str, Any]) -> dict[str, Any]:
        """Inference on one micro-batch; returns a dict batch."""
        raise NotImplementedError(f"{type(self).__name__} does not define forward_step")

    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, float] | None:
        """One optimizer step over a global batch given as micro-batches; may return metrics."""
        raise NotImplementedError(f"{type(self).__name__} does not define train_step")

    def eval_step(self, data: dict[str, Any]) -> dict[str, Any]:
        """Evaluation on one micro-batch; defaults to ``forward_step``."""
        return self.forward_step(data)

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of this module: tensors, numbers, strings, lists and
        dicts of them (loaded with ``weights_only=True``). Default: nothing; override with
        ``load_checkpoint_state`` to keep more (a learning-rate scheduler, counters)."""
        return {}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore what ``checkpoint_state`` returned, after ``setup()``."""

    def map_sync_name(self, src_name: str) -> str | None:
        """Name of this module's parameter that receives source parameter ``src_name``
        in a parameter sync, or ``None`` to skip it. Default: the same name."""
        return src_name

    def missing_step_method(self, method: str) -> str | None:
        """Why ``method`` cannot be called on this module, or ``None`` when it can."""
        cls = type(self)
        if not callable(getattr(cls, method, None)):
            return f"{cls.__name__} has no method {method!r}"
        defined = {
            m
            for m in ("forward_step", "train_step", "eval_step")
            if getattr(cls, m) is not getattr(BaseModule, m)
        }
        if method in ("forward_step", "train_step") and method not in defined:
            what = "a list of micro-batch dicts" if method == "train_step" else "a dict batch"
            return f"{cls.__name__} does not define {method} (it receives {what})"
        if method == "eval_step" and not defined & {"eval_step", "forward_step"}:
            return f"{cls.__name__} defines neither eval_step nor forward_step"
        return None

    def meta_parameters(self, config: Config | None = None) -> dict[str, torch.Tensor]:
        """``self.model``'s parameters as meta tensors (shape and dtype, no storage), from
        running ``setup()`` on the meta device; empty when setup builds no ``nn.Module``.
        ``config`` is the run's config that ``setup()`` reads (``models.<name>.args``) when
        the module has none yet, as under ``flowc compile``. Tensors get shapes but no
        storage, so even a 70B model is sized in milliseconds with no memory; the module is
        left exactly as it was.

        Example::

            >>> class Wide(TorchModule):
            ...     def setup(self):
            ...         self.model = torch.nn.Linear(50_000, 50_000)
            >>> wide = Wide("wide")
            >>> {n: (tuple(p.shape), p.device.type) for n, p in wide.meta_parameters().items()}
            {'weight': ((50000, 50000), 'meta'), 'bias': ((50000,), 'meta')}
            >>> wide.model is None
            True
        """
        saved = copy.copy(vars(self))
        try:
            if config is not None and getattr(self, "config", None) is None:
                self.config = config
            with torch.device("meta"):
                self.setup()
            network = getattr(self, "model", None)
            if not isinstance(network, torch.nn.Module):
                return {}
            network = getattr(network, "module", network)
            return dict(network.named_parameters())
        except FlowgraphError:
            raise  # already names the key to fix (e.g. a flowgraph.rl module's args)
        except Exception as err:
            name = getattr(self, "name", type(self).__name__)
            raise PlanError(
                f"could not size model {name!r}: its setup() failed on the meta device "
                f"({type(err).__name__}: {err}); set models.{name}.params (e.g. 7B) in the config"
            ) from None
        finally:
            vars(self).clear()
            vars(self).update(saved)

    def measure_params(self, config: Config | None = None) -> int:
        """Parameters of ``self.model`` after ``setup()`` on the meta device (0 without one).

        Example::

            >>> class Big(TorchModule):
            ...     def setup(self):
            ...         self.model = torch.nn.Linear(50_000, 50_000)
            >>> Big("big").measure_params()
            2500050000
        """
        return sum(p.numel() for p in self.meta_parameters(config).values())


for _step in ("forward_step", "train_step", "eval_step"):
    setattr(BaseModule, _step, _recordable(getattr(BaseModule, _step)))


class TorchModule(BaseModule):
    """A module whose network is a ``torch.nn.Module`` in ``self.model``.

    Build ``self.model`` (and, when trained, ``self.optimizer``) in ``setup()``;
    parameter sync, checkpoints and offload act on them.

    Example::

        >>> class ValueTrainer(TorchModule):
        ...     def setup(self):
        ...         self.model = torch.nn.Linear(4, 1)
        ...         self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        >>> v = ValueTrainer("ppo_value"); v.setup(); v.parameter_count()
        5
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def sync_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` pairs that parameter sync reads from or writes into."""
        network = self.model
        if network is None:
            raise EngineError(
                f"{self!r} has no self.model after setup(); parameter sync needs setup() "
                "to assign a torch.nn.Module to self.model"
            )
        network = getattr(network, "module", network)  # DDP keeps the user's net in .module
        return iter(network.named_parameters())

    def parameter_count(self) -> int:
        """Number of parameters in ``self.model``."""
        return sum(t.numel() for _, t in self.sync_parameters())

    def checkpoint_state(self) -> dict[str, Any]:
        """``self.model``'s state dict (without a DDP wrapper) and ``self.optimizer``'s.
        Subclasses that keep more call ``super()`` and add their keys."""
        network = getattr(self.model, "module", self.model)
        state: dict[str, Any] = {"model": network.state_dict() if network is not None else {}}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        network = getattr(self.model, "module", self.model)
        if network is not None:
            network.load_state_dict(state["model"])
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])


class DeepSpeedModule(TorchModule):
    """A trainer whose ``self.model``/``self.optimizer`` are handed to ``deepspeed.initialize``
    on its mesh after ``setup()`` (ZeRO stage from ``models.<name>.zero_stage``).

    ``self.engine`` is then the DeepSpeed engine; ``train_step`` calls
    ``self.engine.backward(loss)`` and ``self.engine.step()`` once per micro-batch (DeepSpeed
    accumulates over the step's micro-batches). Pass a torch optimizer: DeepSpeed's own
    Adam compiles for minutes on first use.

    Example::

        class PolicyTrainer(DeepSpeedModule):
            def setup(self):
                self.model = TinyGPT(...)
                self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

            def train_step(self, micro_batches):
                for mb in micro_batches:
                    loss = self.model(mb["x"]).pow(2).mean()
                    self.engine.backward(loss)
                    self.engine.step()
                return {"loss": loss.item()}
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.engine = None

    def deepspeed_config(self, mesh_size: int) -> dict:
        """The DeepSpeed config; override to add fields (bf16, clipping, ...)."""
        runtime = self.runtime_config
        micro = runtime.train_micro_batch_size
        accumulation = runtime.global_batch_size // (micro * mesh_size)
        return {
            "train_batch_size": micro * accumulation * mesh_size,
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accumulation,
            "zero_optimization": {"stage": self.model_config.zero_stage},
            "zero_allow_untested_optimizer": True,  # any torch optimizer works
            "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at 1.0 unless told otherwise
            "steps_per_print": 2**31 - 1,
        }

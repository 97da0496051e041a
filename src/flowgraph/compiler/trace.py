"""Tracing: run a flow once with a ``Proxy`` for its batch and record a ``Graph``.

A call of a ``BaseModule`` method that receives a Proxy is not executed; it becomes a
``call_model`` node and returns a new Proxy. Anything that needs a Proxy's value raises a
``TraceError`` subclass at the user's line, saying what to do instead.

Example::

    >>> from flowgraph import BaseModule
    >>> class Policy(BaseModule):
    ...     def forward_step(self, data):
    ...         return data
    >>> policy = Policy("policy")
    >>> def env_flow(batch):
    ...     policy_out = policy.forward_step(batch)
    ...     return policy_out
    >>> print(trace_flow(env_flow).graph)
    graph env_flow(batch):
      %policy_out = call_model[policy.forward_step](%batch)  # <doctest ...>:2
      return %policy_out
"""

from __future__ import annotations

import dis
import functools
import inspect
import linecache
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flowgraph.compiler.graph import Graph, Node, SourceLocation
from flowgraph.errors import (
    ArithmeticTraceError,
    ControlFlowError,
    EngineError,
    FlowDefinitionError,
    IndexingError,
    InspectionError,
    IterationError,
    LenError,
    ModelCallError,
    TraceError,
)
from flowgraph.module import BaseModule, recording

# The flowgraph package folder (this file is flowgraph/compiler/trace.py). Like the
# filenames it is compared with, it is made absolute without resolving symlinks.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STORE_OPS = {"STORE_FAST", "STORE_NAME", "STORE_GLOBAL", "STORE_DEREF"}
_MODEL_FIX = (
    "do this inside a model's method (forward_step/train_step/eval_step), where the batch "
    "holds real values; a flow only wires model calls together"
)


def is_framework_file(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep)


class Proxy:
    """Placeholder for a batch while a flow is traced. It records, never computes.

    ``str(proxy)`` works (so ``print`` in a flow is fine); everything that needs a value
    raises a ``TraceError`` subclass naming the misuse, the producing call and the fix.
    """

    __slots__ = ("_tracer", "_node")

    def __init__(self, tracer: Tracer, node: Node) -> None:
        self._tracer = tracer
        self._node = node

    def __repr__(self) -> str:
        return f"Proxy(%{self._node.name})"

    def _misuse(self, error: type[TraceError], what: str, fix: str = _MODEL_FIX):
        raise self._tracer.misuse_error(self, error, what, fix)

    def __bool__(self):
        self._misuse(
            ControlFlowError,
            "is used as a condition (`if`, `while`, `and`/`or`/`not` or bool())",
            "branch inside the model's forward_step, where the batch has values; which "
            "models run must not depend on data",
        )

    def __iter__(self):
        self._misuse(
            IterationError,
            "is iterated over or unpacked",
            "loop over samples inside the model's method; flowgraph already splits the "
            "data into micro-batches of runtime.generation_batch_size",
        )

    def __len__(self):
        self._misuse(
            LenError,
            "is passed to len()",
            "the micro-batch size is runtime.generation_batch_size in the config; sizes of "
            "real batches are known only inside a model's method",
        )

    def __getitem__(self, key):
        self._misuse(
            IndexingError,
            f"is indexed with [{key!r}]",
            "read keys inside the model that consumes the batch: it receives the whole dict",
        )

    def __setitem__(self, key, value):
        self._misuse(
            IndexingError,
            f"is assigned to at [{key!r}]",
            "add keys in the producing model's return value: return {**data, key: value}",
        )

    def __delitem__(self, key):
        self._misuse(IndexingError, f"has key [{key!r}] deleted")

    def __contains__(self, key):
        self._misuse(IndexingError, f"is tested with `{key!r} in ...`")

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        self._misuse(
            IndexingError,
            f"has its attribute .{name} read",
            "a batch is a dict known only at run time: read it inside a model's method",
        )

    def __call__(self, *args, **kwargs):
        self._misuse(InspectionError, "is called like a function")

    def _number(self):
        self._misuse(ArithmeticTraceError, "is converted to a number")

    __int__ = __float__ = __index__ = __complex__ = _number

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        flat = list(args) + list((kwargs or {}).values())
        proxy = next(a for a in _flatten(flat) if isinstance(a, Proxy))
        name = getattr(func, "__name__", str(func))
        proxy._misuse(
            InspectionError,
            f"is passed to the torch function {name}()",
            "call torch inside a model's method; to run a plain torch.nn.Module in a flow, "
            "wrap it in a TorchModule subclass and call its forward_step",
        )


def _arithmetic(symbol: str) -> Callable[..., Any]:
    def method(self: Proxy, *other: Any) -> Any:
        self._misuse(ArithmeticTraceError, f"is used in arithmetic or a comparison (`{symbol}`)")

    return method


for _dunder, _symbol in {
    "add": "+",
    "sub": "-",
    "mul": "*",
    "truediv": "/",
    "floordiv": "//",
    "mod": "%",
    "pow": "**",
    "matmul": "@",
    "and": "&",
    "or": "|",
    "xor": "^",
    "lshift": "<<",
    "rshift": ">>",
    "radd": "+",
    "rsub": "-",
    "rmul": "*",
    "rtruediv": "/",
    "rfloordiv": "//",
    "rmod": "%",
    "rpow": "**",
    "rmatmul": "@",
    "rand": "&",
    "ror": "|",
    "rxor": "^",
    "neg": "-",
    "pos": "+",
    "abs": "abs()",
    "invert": "~",
    "lt": "<",
    "le": "<=",
    "gt": ">",
    "ge": ">=",
    "eq": "==",
    "ne": "!=",
    "iadd": "+=",
    "isub": "-=",
    "imul": "*=",
    "itruediv": "/=",
    "ior": "|=",
}.items():
    setattr(Proxy, f"__{_dunder}__", _arithmetic(_symbol))
Proxy.__hash__ = object.__hash__  # type: ignore[method-assign]  # usable as a dict key


def _flatten(values: Any) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if isinstance(v, list | tuple):
            out.extend(_flatten(v))
        elif isinstance(v, dict):
            out.extend(_flatten(list(v.values())))
        else:
            out.append(v)
    return out


@dataclass
class TracedFlow:
    """A flow's graph plus the module objects its ``call_model`` nodes refer to."""

    graph: Graph
    modules: dict[str, BaseModule] = field(default_factory=dict)
    function: Callable[..., Any] | None = None

    def __str__(self) -> str:
        return str(self.graph)


def bind_module(registry: dict[str, BaseModule], module: BaseModule, where: str) -> None:
    """Add ``module`` to ``registry`` under its name; two objects with one name are an error."""
    other = registry.get(module.name)
    if other is None:
        registry[module.name] = module
    elif other is not module:
        raise EngineError(
            f"two different modules are named {module.name!r} ({type(other).__name__} and "
            f"{type(module).__name__}, {where}); names key the config and must be unique "
            "within one Engine: give one of them another name"
        )


class Tracer:
    """Records the model calls of one flow into a ``Graph``."""

    def __init__(self, flow: Callable[..., Any], name: str | None = None) -> None:
        self.flow = flow
        self.flow_code = getattr(flow, "__code__", None)
        self.graph = Graph(name or getattr(flow, "__name__", "flow"))
        self.modules: dict[str, BaseModule] = {}

    # -- the entry point -------------------------------------------------------------
    def trace(self) -> TracedFlow:
        param = self._batch_parameter()
        batch = Proxy(self, self.graph.add(Node(param, "input", param)))
        try:
            with recording(self):
                result = self.flow(batch)
        except TraceError as err:
            raise err.with_traceback(_user_frames(err.__traceback__)) from None
        self.graph.add(Node("output", "output", "output", self._returned(result)))
        self.graph.lint(known_models=set(self.modules))
        return TracedFlow(self.graph, self.modules, self.flow)

    def _batch_parameter(self) -> str:
        if not callable(self.flow):
            raise FlowDefinitionError(
                f"a flow must be a function taking one batch argument, got "
                f"{type(self.flow).__name__}; e.g. Environment(env_flow) with "
                "def env_flow(batch): ..."
            )
        try:
            params = list(inspect.signature(self.flow).parameters.values())
        except (TypeError, ValueError):
            return "batch"
        positional = [
            p
            for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
        if len(positional) != 1 or any(p.kind == p.VAR_POSITIONAL for p in params):
            raise FlowDefinitionError(
                f"flow {self.graph.name} ({self._flow_location()}) takes "
                f"({', '.join(p.name for p in params)}); a flow takes exactly one argument, "
                f"the batch: def {self.graph.name}(batch): ..."
            )
        return positional[0].name

    def _flow_location(self) -> str:
        if self.flow_code is None:
            return "?"
        return str(SourceLocation(self.flow_code.co_filename, self.flow_code.co_firstlineno))

    def _return_location(self) -> str:
        """The flow's ``return <value>`` line(s) (what a wrong return value is reported
        at), or its ``def`` line when it has none (a lambda)."""
        if self.flow_code is None:
            return "?"
        returns = [i for i in dis.get_instructions(self.flow_code) if i.opname == "RETURN_VALUE"]
        lines = sorted({i.positions.lineno for i in returns if i.positions and i.positions.lineno})
        if not lines or lines == [self.flow_code.co_firstlineno]:
            return self._flow_location()
        name = self.flow_code.co_filename
        return " or ".join(str(SourceLocation(name, line)) for line in lines)

    def _returned(self, result: Any) -> tuple[str, ...]:
        if result is None:
            return ()
        if isinstance(result, Proxy) and result._tracer is self:
            return (result._node.name,)
        where = f"flow {self.graph.name} ({self._return_location()})"
        if isinstance(result, list | tuple) and any(isinstance(r, Proxy) for r in result):
            names = ", ".join(f"%{r._node.name}" for r in result if isinstance(r, Proxy))
            raise FlowDefinitionError(
                f"{where} returns {len(result)} values ({names}); a flow returns one model "
                "output or nothing: merge them with one more model call, e.g. "
                "return reward.forward_step(a, b)"
            )
        raise FlowDefinitionError(
            f"{where} returns a {type(result).__name__}; a flow returns one model output "
            "(the result of a model call) or nothing"
        )

    # -- model calls -----------------------------------------------------------------
    def intercepts(self, method: str, args: tuple, kwargs: dict) -> bool:
        """Whether a call of ``module.method`` is recorded instead of run."""
        if method.endswith("_step"):
            return True
        return any(isinstance(a, Proxy) for a in _flatten([args, kwargs]))

    def record_call(
        self, module: BaseModule, method: str, args: tuple, kwargs: dict
    ) -> Proxy | None:
        frame = _user_frame()
        source = _location(frame)
        target = f"{module.name}.{method}"
        self._check_call_arguments(target, args, kwargs, source)
        missing = module.missing_step_method(method)
        if missing:
            raise ModelCallError(f"{source}: {target}(...) cannot be recorded: {missing}")
        bind_module(self.modules, module, f"second one called at {source}")
        name = self._unique_name(_assigned_name(frame) or f"{module.name}_{method}")
        inputs = tuple(a._node.name for a in args)
        node = self.graph.add(Node(name, "call_model", target, inputs, source))
        return Proxy(self, node)

    def _check_call_arguments(
        self, target: str, args: tuple, kwargs: dict, source: SourceLocation
    ) -> None:
        prefix = f"{source}: {target}"
        if kwargs:
            raise ModelCallError(
                f"{prefix} gets keyword arguments ({', '.join(kwargs)}); model calls take "
                "batches as positional arguments only; put settings in the config under "
                "models.<name>.args and read them from self.model_config.args"
            )
        if not args:
            raise ModelCallError(
                f"{prefix}() has no inputs; a model call takes one or more batches: pass "
                "the flow's batch or another model's output"
            )
        for i, arg in enumerate(args, start=1):
            if not isinstance(arg, Proxy):
                hint = (
                    " (it holds batches: pass them as separate arguments)"
                    if any(isinstance(a, Proxy) for a in _flatten([arg]))
                    else ""
                )
                raise ModelCallError(
                    f"{prefix}: argument {i} is a {type(arg).__name__}{hint}; every "
                    "argument of a model call must be the flow's batch or a model output; "
                    "constants belong in models.<name>.args of the config"
                )
            if arg._tracer is not self:
                raise ModelCallError(
                    f"{prefix}: argument {i} ({arg!r}) comes from another flow "
                    f"({arg._tracer.graph.name}); flows exchange data only through the "
                    "Engine (env output -> trainer), not through variables"
                )

    def _unique_name(self, base: str) -> str:
        name, n = base, 1
        while name in self.graph.dag:
            name, n = f"{base}_{n}", n + 1
        return name

    # -- errors ----------------------------------------------------------------------
    def misuse_error(
        self, proxy: Proxy, error: type[TraceError], what: str, fix: str
    ) -> TraceError:
        here = _user_frame()
        at = _location(here)
        flow_frame = self._flow_frame(here)
        node = proxy._node
        if node.op == "input":
            origin = f"the flow's argument `{node.target}`"
        else:
            origin = f"%{node.name}, the output of {node.target} ({node.source})"
        lines = [f"{at}: {origin} {what} in flow {self.graph.name}"]
        if at.code:
            lines.append(f"    {at.code}")
        if flow_frame is not None and flow_frame is not here:
            lines.append(f"  called from the flow at {_location(flow_frame)}")
        lines.extend(_not_a_module_hint(here))
        lines.append("  While a flow is traced, batches are placeholders with no values yet.")
        lines.append(f"  Fix: {fix}.")
        return error("\n".join(lines))

    def _flow_frame(self, start: types.FrameType | None) -> types.FrameType | None:
        frame = start
        while frame is not None and frame.f_code is not self.flow_code:
            frame = frame.f_back
        return frame


def _user_frame() -> types.FrameType | None:
    """The innermost frame outside flowgraph (and outside torch's own Python code)."""
    frame = sys._getframe(1)
    while frame is not None and (
        is_framework_file(frame.f_code.co_filename) or _is_library(frame.f_code.co_filename)
    ):
        frame = frame.f_back
    return frame


def _not_a_module_hint(frame: types.FrameType | None) -> list[str]:
    """A hint when the misuse happened inside a step method of a non-BaseModule object."""
    owner = frame.f_locals.get("self") if frame is not None else None
    if owner is None or isinstance(owner, BaseModule) or not frame.f_code.co_name.endswith("_step"):
        return []
    return [
        f"  {type(owner).__name__} is not a BaseModule, so its {frame.f_code.co_name} ran "
        "instead of being recorded: subclass flowgraph.TorchModule (or BaseModule)"
    ]


def _is_library(filename: str) -> bool:
    return f"{os.sep}torch{os.sep}" in filename


def _location(frame: types.FrameType | None) -> SourceLocation:
    if frame is None:
        return SourceLocation("?", 0)
    filename, line = frame.f_code.co_filename, frame.f_lineno
    return SourceLocation(filename, line, linecache.getline(filename, line).strip())


@functools.lru_cache(maxsize=256)
def _instructions(code: types.CodeType) -> tuple[dis.Instruction, ...]:
    return tuple(dis.get_instructions(code))


def _assigned_name(frame: types.FrameType | None) -> str | None:
    """The variable the current call's result is stored into (``x = model.f(b)`` -> x)."""
    if frame is None:
        return None
    for instr in _instructions(frame.f_code):
        if instr.offset > frame.f_lasti and instr.opname != "CACHE":
            return instr.argval if instr.opname in _STORE_OPS else None
    return None


def _user_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """``tb`` without flowgraph's own frames, so the user's line is the last one shown."""
    kept = []
    while tb is not None:
        if not is_framework_file(tb.tb_frame.f_code.co_filename):
            kept.append(tb)
        tb = tb.tb_next
    new: types.TracebackType | None = None
    for entry in reversed(kept):
        new = types.TracebackType(new, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return new


def trace_flow(flow: Callable[..., Any], name: str | None = None) -> TracedFlow:
    """Trace ``flow`` once and return its graph and the modules it calls."""
    return Tracer(flow, name).trace()

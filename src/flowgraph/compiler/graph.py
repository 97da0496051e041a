"""The IR: a dataflow ``Graph`` of typed, frozen ``Node``s over a ``networkx.DiGraph``.

Opcodes (a closed set):

- ``input``: the flow's batch argument. ``target`` is the parameter name.
- ``call_model``: ``model.method(*inputs)``. ``target`` is ``"model.method"``; ``inputs``
  are the names of the nodes whose outputs are merged into the call's one input dict.
- ``output``: what the flow returns; ``inputs`` holds zero or one node name.

``Graph.__str__`` is deterministic and is the contract that golden tests snapshot::

    graph env_flow(batch):
      %policy_out = call_model[policy.forward_step](%batch)       # train.py:31
      return %policy_out

Passes annotate nodes through ``Graph.meta[node_name]``, a free dict per node.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import networkx as nx

from flowgraph.errors import FlowDefinitionError

Opcode = Literal["input", "call_model", "output"]
OPCODES: tuple[Opcode, ...] = ("input", "call_model", "output")
TRAIN_METHOD = "train_step"


@dataclass(frozen=True)
class SourceLocation:
    """Where in the user's code a node was recorded."""

    file: str
    line: int
    code: str = ""

    def __str__(self) -> str:
        return f"{os.path.basename(self.file)}:{self.line}"


@dataclass(frozen=True)
class Node:
    """One operation of a flow. Immutable; per-pass annotations live in ``Graph.meta``."""

    name: str
    op: Opcode
    target: str
    inputs: tuple[str, ...] = ()
    source: SourceLocation | None = None

    def __post_init__(self) -> None:
        if self.op not in OPCODES:
            raise ValueError(f"unknown opcode {self.op!r}; expected one of {OPCODES}")

    @property
    def model(self) -> str:
        """Model name of a ``call_model`` node (``"policy"`` for ``policy.forward_step``)."""
        return self.target.partition(".")[0]

    @property
    def method(self) -> str:
        """Method name of a ``call_model`` node (``"forward_step"``)."""
        return self.target.partition(".")[2]

    def __str__(self) -> str:
        args = ", ".join(f"%{i}" for i in self.inputs)
        if self.op == "input":
            return f"%{self.name} = input[{self.target}]"
        if self.op == "output":
            return f"return {args}" if args else "return"
        return f"%{self.name} = call_model[{self.target}]({args})"


@dataclass
class Graph:
    """A traced flow: nodes in recording order, edges from producers to consumers.

    Example::

        >>> g = Graph("f")
        >>> batch = g.add(Node("batch", "input", "batch"))
        >>> out = g.add(Node("out", "call_model", "policy.forward_step", ("batch",)))
        >>> end = g.add(Node("output", "output", "output", ("out",)))
        >>> print(g)
        graph f(batch):
          %out = call_model[policy.forward_step](%batch)
          return %out
    """

    name: str
    dag: nx.DiGraph = field(default_factory=nx.DiGraph)
    meta: dict[str, dict] = field(default_factory=dict)

    def add(self, node: Node) -> Node:
        if "node" in self.dag.nodes.get(node.name, {}):
            raise FlowDefinitionError(f"graph {self.name}: node name {node.name!r} used twice")
        self.dag.add_node(node.name, node=node)
        for producer in node.inputs:
            self.dag.add_edge(producer, node.name)
        self.meta[node.name] = {}
        return node

    def __iter__(self) -> Iterator[Node]:
        """Nodes in recording order (a topological order by construction)."""
        return (data["node"] for _, data in self.dag.nodes(data=True) if "node" in data)

    def __len__(self) -> int:
        return self.dag.number_of_nodes()

    def node(self, name: str) -> Node:
        return self.dag.nodes[name]["node"]

    @property
    def input_node(self) -> Node:
        return next(n for n in self if n.op == "input")

    @property
    def output_node(self) -> Node:
        return next(n for n in self if n.op == "output")

    @property
    def returned(self) -> Node | None:
        """The node whose value the flow returns, or ``None``."""
        inputs = self.output_node.inputs
        return self.node(inputs[0]) if inputs else None

    def calls(self) -> list[Node]:
        """The ``call_model`` nodes in recording order."""
        return [n for n in self if n.op == "call_model"]

    def models(self) -> list[str]:
        """Model names in order of first call."""
        return list(dict.fromkeys(n.model for n in self.calls()))

    def consumers(self, name: str) -> list[Node]:
        return [self.node(s) for s in self.dag.successors(name)]

    def __str__(self) -> str:
        nodes = list(self)
        params = ", ".join(n.target for n in nodes if n.op == "input")
        body = [(str(n), n.source) for n in nodes if n.op != "input"]
        width = max((len(text) for text, src in body if src), default=0)
        lines = [f"graph {self.name}({params}):"]
        for text, src in body:
            lines.append(f"  {text.ljust(width)}  # {src}" if src else f"  {text}")
        return "\n".join(lines)

    def lint(self, known_models: set[str] | None = None) -> None:
        """Check the invariants every pass may rely on; raise ``FlowDefinitionError``.

        - exactly one ``input`` and one ``output`` node, recording order is topological;
        - every edge refers to an existing node, and the graph is acyclic;
        - every model is known (when ``known_models`` is given);
        - no model is both trained and served in one flow;
        - the output of ``train_step`` (metrics) feeds no other model.
        """
        nodes = list(self)
        undefined = [name for name, data in self.dag.nodes(data=True) if "node" not in data]
        if undefined:
            raise FlowDefinitionError(
                f"graph {self.name}: %{undefined[0]} is used but never defined"
            )
        for op in ("input", "output"):
            count = sum(n.op == op for n in nodes)
            if count != 1:
                raise FlowDefinitionError(f"graph {self.name}: {count} {op} nodes, expected 1")
        seen: set[str] = set()
        for node in nodes:
            for producer in node.inputs:
                if producer not in seen:
                    raise FlowDefinitionError(
                        f"graph {self.name}: %{node.name} uses %{producer} before it is defined"
                    )
            seen.add(node.name)
        if not nx.is_directed_acyclic_graph(self.dag):
            raise FlowDefinitionError(f"graph {self.name}: the dataflow has a cycle")
        calls = self.calls()
        if known_models is not None:
            for node in calls:
                if node.model not in known_models:
                    raise FlowDefinitionError(
                        f"graph {self.name}: %{node.name} calls unknown model {node.model!r} "
                        f"({node.source})"
                    )
        self._lint_train_and_serve(calls)
        for node in calls:
            if node.method != TRAIN_METHOD:
                continue
            for consumer in self.consumers(node.name):
                if consumer.op == "call_model":
                    raise FlowDefinitionError(
                        f"graph {self.name}: {consumer.target} at {consumer.source} takes the "
                        f"result of {node.target} ({node.source}); train_step returns metrics, "
                        "not a batch, so no model can consume it"
                    )

    def _lint_train_and_serve(self, calls: list[Node]) -> None:
        trained = {n.model: n for n in calls if n.method == TRAIN_METHOD}
        for node in calls:
            if node.model in trained and node.method != TRAIN_METHOD:
                t = trained[node.model]
                raise FlowDefinitionError(
                    f"graph {self.name}: model {node.model!r} is trained ({t.target} at "
                    f"{t.source}) and served ({node.target} at {node.source}) in one flow; "
                    "use a separate inference module and set_parameter_sync(trainer, inference)"
                )

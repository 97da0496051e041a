"""Lowering: a traced ``Graph`` becomes a phase's node table in the plan (``PhaseSpec``).

The plan is self-contained: the runtime never sees a ``Graph``, only these tables, so it
imports nothing from the tracer or the IR.

Example::

    >>> from flowgraph.compiler.graph import Graph, Node
    >>> g = Graph("env_flow")
    >>> _ = g.add(Node("batch", "input", "batch"))
    >>> _ = g.add(Node("out", "call_model", "policy.forward_step", ("batch",)))
    >>> _ = g.add(Node("output", "output", "output", ("out",)))
    >>> print(lower_graph(g, width=2))
    flow env_flow(batch):
      %out = call_model[policy.forward_step](%batch)
      return %out
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from flowgraph.compiler.graph import Graph
from flowgraph.compiler.plan import NodeSpec, PhaseSpec

ROLES = {"env": "env", "trainer": "train", "eval": "eval"}  # graph role -> plan phase


def lower_graph(graph: Graph, width: int = 1) -> PhaseSpec:
    """The node table of one traced flow."""
    nodes = [
        NodeSpec(n.name, n.model, n.method, n.inputs, str(n.source) if n.source else "")
        for n in graph.calls()
    ]
    returned = graph.returned.name if graph.returned is not None else None
    return PhaseSpec(graph.name, graph.input_node.name, nodes, returned, width)


def lower(graphs: Mapping[str, Graph], mesh_size: Mapping[str, int]) -> dict[str, PhaseSpec]:
    """Every role's graph as its phase; a wave of env/eval is ``lcm`` of its mesh sizes."""
    phases = {}
    for role, graph in graphs.items():
        phase = ROLES[role]
        sizes = [mesh_size[m] for m in graph.models()] or [1]
        phases[phase] = lower_graph(graph, 1 if phase == "train" else math.lcm(*sizes))
    return phases

"""Execute a traced graph in this process, with every model local.

``run_inference_graph`` streams one micro-batch through an env or eval graph;
``run_train_graph`` runs a trainer graph once per global step, handing each
``train_step`` the list of micro-batches. A model's exception is re-raised with a note
naming the node and the user's source line, torch.fx style::

    While executing %ref_out = call_model[reference.forward_step](%policy_out)  # train.py:32
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flowgraph.compiler.graph import TRAIN_METHOD, Graph, Node
from flowgraph.data import Batch, concat, merge_inputs, split
from flowgraph.errors import DataError
from flowgraph.module import BaseModule
from flowgraph.runtime.telemetry import MetricAverager, StageTimer


class GraphRunner:
    """Runs the nodes of one graph against the modules it names."""

    def __init__(self, graph: Graph, modules: Mapping[str, BaseModule], stage: str) -> None:
        self.graph = graph
        self.modules = modules
        self.stage = stage
        self.calls = graph.calls()
        self.returned = graph.returned

    def run_inference(self, batch: Batch, timer: StageTimer) -> Batch | None:
        """One micro-batch through the graph; returns the flow's returned batch."""
        values: dict[str, Any] = {self.graph.input_node.name: batch}
        for node in self.calls:
            data = self._merged_input(node, values)
            module = self.modules[node.model]
            with timer.stage(f"{self.stage}/{node.model}"):
                values[node.name] = self._call_chunked(node, module, data)
        return values[self.returned.name] if self.returned is not None else None

    def run_train(
        self, micro_batches: Sequence[Batch], timer: StageTimer, metrics: MetricAverager
    ) -> None:
        """One global step: ``train_step`` gets the list of micro-batches; other model
        calls in a trainer flow run per micro-batch."""
        values: dict[str, Any] = {self.graph.input_node.name: list(micro_batches)}
        for node in self.calls:
            module = self.modules[node.model]
            per_micro = [
                self._merged_input(node, {k: v[i] for k, v in values.items()})
                for i in range(len(micro_batches))
            ]
            with timer.stage(f"{self.stage}/{node.model}"):
                if node.method == TRAIN_METHOD:
                    result = self._call(node, module, per_micro)
                    metrics.add(node.model, result if isinstance(result, Mapping) else None)
                    values[node.name] = [None] * len(micro_batches)
                else:
                    values[node.name] = [self._call(node, module, mb) for mb in per_micro]

    def _merged_input(self, node: Node, values: Mapping[str, Any]) -> Batch:
        inputs = [values[name] for name in node.inputs]
        producers = [self._producer(name) for name in node.inputs]
        return merge_inputs(inputs, producers)

    def _producer(self, name: str) -> str:
        node = self.graph.node(name)
        return f"the flow input %{name}" if node.op == "input" else f"{node.target} ({node.source})"

    def _call_chunked(self, node: Node, module: BaseModule, data: Batch) -> Batch:
        limit = module.model_config.generation_batch_size
        if limit is None:
            return self._call(node, module, data)
        chunks = split(data, limit)
        if len(chunks) == 1:
            return self._call(node, module, data)
        return concat([self._call(node, module, chunk) for chunk in chunks])

    def _call(self, node: Node, module: BaseModule, data: Any) -> Any:
        try:
            result = getattr(module, node.method)(data)
        except Exception as err:
            _add_note(err, f"While executing {node}  # {node.source} (flow {self.graph.name})")
            raise
        if node.method != TRAIN_METHOD and not isinstance(result, Mapping):
            raise DataError(
                f"{node.target} returned a {type(result).__name__}; a model call in a flow "
                f"({node.source}) must return a dict batch, e.g. return {{**data, 'y': y}}"
            )
        return result


def _add_note(err: BaseException, note: str) -> None:
    if hasattr(err, "add_note"):
        err.add_note(note)

"""Execute a traced graph in this process, with every model local.

``run_inference_graph`` streams one micro-batch through an env or eval graph;
``run_train_graph`` runs a trainer graph once per global step, handing each
``train_step`` the list of micro-batches. A model's exception is re-raised with a note
naming the node and the user's source line, torch.fx style::

    While executing %ref_out = call_model[reference.forward_step](%policy_out)  # train.py:32
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flowgraph.compiler.graph import TRAIN_METHOD, Graph, Node
from flowgraph.data import Batch, concat, merge_inputs, split
from flowgraph.errors import DataError
from flowgraph.module import BaseModule
from flowgraph.runtime.rng import reseed
from flowgraph.runtime.telemetry import MetricAverager, StageTimer
from flowgraph.runtime.timeline import Timeline


@dataclass(frozen=True)
class _Step:
    """A ``call_model`` node resolved once: its module, inputs and chunk size."""

    node: Node
    module: BaseModule
    producers: tuple[str, ...]
    chunk: int | None
    timer_key: str


class GraphRunner:
    """Runs the nodes of one graph against the modules it names."""

    def __init__(self, graph: Graph, modules: Mapping[str, BaseModule], stage: str) -> None:
        self.graph = graph
        self.stage = stage
        self.timeline = Timeline(0, enabled=False)  # the one-process runner sets its own
        self.input_name = graph.input_node.name
        self.returned = graph.returned
        self.steps = [
            _Step(
                node,
                modules[node.model],
                tuple(self._producer(name) for name in node.inputs),
                modules[node.model].model_config.generation_batch_size,
                f"{stage}/{node.model}",
            )
            for node in graph.calls()
        ]

    def run_inference(self, batch: Batch, timer: StageTimer, rng: tuple = ()) -> Batch | None:
        """One micro-batch through the graph; returns the flow's returned batch.

        ``rng`` (run seed, episode, micro-batch index) reseeds the generators before every
        model call, so results do not depend on which rank computes the micro-batch.
        """
        values: dict[str, Any] = {self.input_name: batch}
        for step in self.steps:
            values[step.node.name] = self.run_node(step, values, timer, rng)
        return values[self.returned.name] if self.returned is not None else None

    def step_for(self, name: str) -> _Step:
        """The resolved step of node ``name``."""
        return next(step for step in self.steps if step.node.name == name)

    def run_node(
        self, step: _Step, values: Mapping[str, Any], timer: StageTimer, rng: tuple = ()
    ) -> Batch:
        """One model call on one micro-batch, its inputs taken from ``values``."""
        data = self._merged_input(step, values)
        if rng:
            seed, *where = rng
            reseed(seed, self.stage, step.node.name, *where)
        with timer.stage(step.timer_key), self._slice(step, rng, "RUN"):
            return self._call_chunked(step, data)

    def run_train(
        self,
        micro_batches: Sequence[Batch],
        timer: StageTimer,
        metrics: MetricAverager,
        rng: tuple = (),
    ) -> None:
        """One global step: ``train_step`` gets the list of micro-batches; other model
        calls in a trainer flow run per micro-batch."""
        values: dict[str, list[Any]] = {self.input_name: list(micro_batches)}
        for step in self.steps:
            values[step.node.name] = self.run_train_node(step, values, timer, metrics, rng)

    def run_train_node(
        self,
        step: _Step,
        values: Mapping[str, list[Any]],
        timer: StageTimer,
        metrics: MetricAverager,
        rng: tuple = (),
    ) -> list[Any]:
        """One node of a trainer graph on one global step (``values``: per micro-batch)."""
        count = len(values[self.input_name])
        per_micro = [
            self._merged_input(step, {k: v[i] for k, v in values.items()}) for i in range(count)
        ]
        if rng:
            seed, *where = rng
            reseed(seed, self.stage, step.node.name, *where)
        op = "TRAIN" if step.node.method == TRAIN_METHOD else "RUN"
        with timer.stage(step.timer_key), self._slice(step, rng, op):
            if step.node.method == TRAIN_METHOD:
                result = self._call(step, per_micro)
                metrics.add(step.module.name, result if isinstance(result, Mapping) else None)
                return [None] * count
            return [self._call(step, mb) for mb in per_micro]

    def _slice(self, step: _Step, rng: tuple, op: str):
        """The timeline slice of a model call, named like the SPMD plan's instruction
        (``RUN policy.forward_step[mb3]``, ``TRAIN ppo_policy[step0]``); nothing is
        formatted when the timeline is off (this runs for every model call)."""
        if not self.timeline.enabled:
            return contextlib.nullcontext()
        if op == "TRAIN":
            name = f"TRAIN {step.node.model}" + (f"[step{rng[-1]}]" if rng else "")
        else:
            name = f"RUN {step.node.target}" + (f"[mb{rng[-1]}]" if rng else "")
        episode = rng[1] if len(rng) > 1 else None
        return self.timeline.slice(name, op, phase=self.stage, episode=episode)

    @staticmethod
    def _merged_input(step: _Step, values: Mapping[str, Any]) -> Batch:
        return merge_inputs([values[name] for name in step.node.inputs], step.producers)

    def _producer(self, name: str) -> str:
        node = self.graph.node(name)
        return f"the flow input %{name}" if node.op == "input" else f"{node.target} ({node.source})"

    def _call_chunked(self, step: _Step, data: Batch) -> Batch:
        if step.chunk is None:
            return self._call(step, data)
        chunks = split(data, step.chunk)
        if len(chunks) == 1:
            return self._call(step, data)
        return concat([self._call(step, chunk) for chunk in chunks])

    def _call(self, step: _Step, data: Any) -> Any:
        node = step.node
        try:
            result = getattr(step.module, node.method)(data)
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

"""The model calls of one phase: what ``RUN`` and ``TRAIN`` execute, on a plan's node.

``Kernels.run`` calls one node's model on one micro-batch: it merges the node's inputs into
one dict, splits it into the model's ``generation_batch_size`` chunks, reseeds the random
generators from what runs (never from where), calls the method and checks that it returned
a dict batch. ``Kernels.run_train`` is one global step of a trainer flow's node:
``train_step`` gets the list of micro-batches. A model's exception is re-raised with a note
naming the node and the user's source line, torch.fx style::

    While executing %ref_out = call_model[reference.forward_step](%policy_out)  # train.py:32
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flowgraph.compiler.plan import NodeSpec, PhaseSpec
from flowgraph.data import Batch, batch_size, concat, merge_inputs, split
from flowgraph.errors import NonFiniteError
from flowgraph.module import BaseModule
from flowgraph.runtime import contracts
from flowgraph.runtime.rng import reseed
from flowgraph.runtime.telemetry import MetricAverager, StageTimer

log = logging.getLogger("flowgraph")


@dataclass(frozen=True)
class _Call:
    """A node resolved once: its module, who produced its inputs, its chunk size."""

    node: NodeSpec
    module: BaseModule
    producers: tuple[str, ...]
    chunk: int | None
    timer_key: str


class Kernels:
    """The nodes of one phase against the modules they name (only hosted ones resolve).

    ``rng`` arguments are ``(run seed, episode, micro-batch or step index)``: the
    generators are reseeded from them and the node before every call, so a result does
    not depend on which rank computes it. ``computing(model)`` is the context a model's
    step methods run in (autocast in its precision).
    """

    def __init__(
        self,
        spec: PhaseSpec,
        modules: Mapping[str, BaseModule],
        phase: str,
        check_merges: bool = False,
        computing: Callable[[str], contextlib.AbstractContextManager] = (
            lambda model: contextlib.nullcontext()
        ),
        on_nonfinite: str = "error",
    ) -> None:
        self.spec, self.phase, self.check_merges = spec, phase, check_merges
        self.on_nonfinite = on_nonfinite
        self.computing = computing
        self.calls = {
            node.name: _Call(
                node,
                modules[node.model],
                tuple(spec.producer(name) for name in node.inputs),
                modules[node.model].model_config.generation_batch_size,
                f"{phase}/{node.model}",
            )
            for node in spec.nodes
        }

    def run(self, name: str, values: Mapping[str, Any], timer: StageTimer, rng: tuple) -> Batch:
        """Node ``name`` on one micro-batch, its inputs taken from ``values``."""
        call = self.calls[name]
        data = self._merged(call, values)
        reseed(rng[0], self.phase, name, *rng[1:])
        with timer.stage(call.timer_key):
            return self._chunked(call, data)

    def run_train(
        self,
        name: str,
        values: Mapping[str, list[Any]],
        timer: StageTimer,
        metrics: MetricAverager,
        rng: tuple,
    ) -> list[Any]:
        """Node ``name`` of a trainer flow on one global step (``values``: per micro-batch).

        ``train_step`` receives the list of micro-batches and its metrics are averaged;
        any other call runs per micro-batch.
        """
        call = self.calls[name]
        count = len(values[self.spec.input])
        per_micro = [self._merged(call, {k: v[i] for k, v in values.items()}) for i in range(count)]
        reseed(rng[0], self.phase, name, *rng[1:])
        with timer.stage(call.timer_key):
            if call.node.trains:
                result = self._call(call, per_micro)
                numbers = contracts.metrics(_where(call.node), result)
                self._check_finite(call.node, numbers, episode=rng[1], step=rng[2])
                metrics.add(call.module.name, numbers)
                return [None] * count
            return [self._call(call, mb) for mb in per_micro]

    def _check_finite(self, node: NodeSpec, numbers: Mapping[str, float], episode: int,
                      step: int) -> None:  # fmt: skip
        """``runtime.on_nonfinite``: a NaN or infinite metric stops the run (``error``) or
        is dropped from the averages with a warning (``skip``)."""
        bad = contracts.non_finite(numbers)
        if not bad:
            return
        values = ", ".join(f"{k} = {numbers[k]}" for k in bad)
        where = f"{node.target} at episode {episode}, global step {step} ({node.source})"
        if self.on_nonfinite == "error":
            raise NonFiniteError(
                f"{where} reported {values}. The last checkpoint is intact. Lower the "
                "learning rate or clip gradients (args.max_grad_norm), or set "
                "runtime.on_nonfinite=skip to drop such steps (the flowgraph.rl trainers "
                "then skip the optimizer step)"
            )
        log.warning("flowgraph: %s reported %s; dropped from the metrics "
                    "(runtime.on_nonfinite=skip)", where, values)  # fmt: skip
        for key in bad:
            numbers.pop(key)  # type: ignore[attr-defined]

    def _merged(self, call: _Call, values: Mapping[str, Any]) -> Batch:
        inputs = [values[name] for name in call.node.inputs]
        return merge_inputs(inputs, call.producers, self.check_merges)

    def _chunked(self, call: _Call, data: Batch) -> Batch:
        if call.chunk is None:
            return self._call(call, data)
        chunks = split(data, call.chunk)
        if len(chunks) == 1:
            return self._call(call, data)
        return concat([self._call(call, chunk) for chunk in chunks])

    def _call(self, call: _Call, data: Any) -> Any:
        node = call.node
        try:
            with self.computing(node.model):
                result = getattr(call.module, node.method)(data)
        except Exception as err:
            if hasattr(err, "add_note"):  # Python 3.11+
                err.add_note(f"While executing {node} (flow {self.spec.flow})")
            raise
        if not node.trains:
            contracts.check_batch(_where(node), result, batch_size(data))
        return result


def _where(node: NodeSpec) -> str:
    """``reward.forward_step (train.py:41)``: the call and the user's line, for messages."""
    return f"{node.target} ({node.source})" if node.source else node.target

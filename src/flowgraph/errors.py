"""Every error flowgraph raises on purpose.

Each class says what causes it and how to fix it. All derive from ``FlowgraphError`` so
that ``except FlowgraphError`` catches exactly the framework's own complaints.

    FlowgraphError
    ├── TraceError            a flow does something that needs a value while tracing
    │   ├── ControlFlowError      ``if``/``while``/``bool()`` on a batch
    │   ├── IterationError        ``for x in batch`` / unpacking a batch
    │   ├── LenError              ``len(batch)``
    │   ├── ArithmeticTraceError  ``batch + 1``, comparisons
    │   ├── IndexingError         ``batch["key"]`` / ``batch.attr``
    │   ├── InspectionError       a batch handed to a function that looks inside it
    │   ├── ModelCallError        a model call with no inputs or with bad arguments
    │   └── FlowDefinitionError   wrong flow signature or return value, lint failures
    ├── ConfigError           unknown keys, bad values, inconsistent settings
    ├── DataError             datasets and batches that cannot be split or merged
    │   └── BatchMergeError       two inputs of one model disagree on a key
    ├── EngineError           engine wiring: modules, names, missing datasets
    │   └── ParameterSyncError    source and destination parameters do not match
    ├── CheckpointError       a checkpoint this run cannot resume from
    ├── ExportError           flowc export cannot write a model (source, model, --out)
    ├── RewardError           a reward function raised or returned a non-number on a row
    ├── NonFiniteError        a trainer reported a NaN or infinite loss
    └── PlanError             the compiler cannot place or schedule the flows
        └── LayoutError           one placement does not fit memory or the batches
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``"did you mean 'policy'? "`` for the closest of ``choices``, or ``""``.

    >>> did_you_mean("polcy", ["policy", "value"])
    "did you mean 'policy'? "
    """
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


class FlowgraphError(Exception):
    """Base class of every error flowgraph raises on purpose."""


class TraceError(FlowgraphError):
    """A flow needed the value of a batch while it was being traced.

    Flows are run once with placeholders (proxies) to record which model feeds which;
    values exist only when the plan runs. Move value-dependent code into a model's
    ``forward_step``/``train_step``, where the batch is real.

    Example::

        def env_flow(batch):
            out = policy.forward_step(batch)
            if out:                      # ControlFlowError: the value is unknown here
                ...
    """


class ControlFlowError(TraceError):
    """``if``, ``while``, ``and``/``or``/``not`` or ``bool()`` on a batch in a flow."""


class IterationError(TraceError):
    """Iterating over or unpacking a batch in a flow."""


class LenError(TraceError):
    """``len()`` of a batch in a flow."""


class ArithmeticTraceError(TraceError):
    """Arithmetic or comparison with a batch in a flow."""


class IndexingError(TraceError):
    """Indexing a batch (``batch["x"]``) or reading an attribute of it in a flow."""


class InspectionError(TraceError):
    """A batch passed to a function (torch, a plain ``nn.Module``, ...) that inspects it."""


class ModelCallError(TraceError):
    """A model call that cannot be recorded: no batch inputs, constant arguments,
    keyword arguments, or a step method the module does not define."""


class FlowDefinitionError(TraceError):
    """A flow whose signature or return value breaks the rules, or a graph that fails
    ``Graph.lint()``."""


class ConfigError(FlowgraphError):
    """Configuration that is unknown, malformed or inconsistent.

    The message names the key (``runtime.sample_per_episode``), the value given, and the
    valid choices.
    """


class DataError(FlowgraphError):
    """A dataset or batch that flowgraph cannot collate, split or concatenate."""


class BatchMergeError(DataError):
    """A model with several inputs received a key from two producers with unequal values.

    Example: ``reward.forward_step(policy_out, ref_out)`` where both outputs carry
    ``"logprobs"`` with different values. Rename the key in one of the producers.
    """


class EngineError(FlowgraphError):
    """Engine wiring that cannot run: a non-module, two modules with one name, a missing
    dataset, a parameter sync between models the engine does not hold."""


class ParameterSyncError(EngineError):
    """``set_parameter_sync(src, dst)`` between models whose parameters do not match.

    The message lists parameters missing on either side and shape or dtype mismatches.
    Override ``map_sync_name(src_name)`` on the destination module to rename or skip
    parameters.
    """


class CheckpointError(FlowgraphError):
    """A checkpoint in ``runtime.checkpoint_dir`` that this run cannot resume from: written
    by other flows, or by another number of ranks when its state is split per rank
    (DeepSpeed). The message names the checkpoint; start afresh with ``runtime.resume=false``
    or another ``checkpoint_dir``, or relaunch as it was written.
    """


class ExportError(FlowgraphError):
    """``flowc export`` cannot write the model: no usable checkpoint at the source, a model
    the checkpoint does not hold or that is no language model, weights that do not fit the
    saved ``args``, an ``--out`` that is not empty (``--force`` replaces it), or no
    ``transformers`` installed. The message names the cause and the fix.

    Example: ``flowc export runs/grpo/ckpt --model policy --out x`` where ``policy`` is an
    inference copy that parameter sync refills: export its trainer (``grpo_policy``).
    """


class RewardError(FlowgraphError):
    """A reward function failed on a row: it raised, returned something that is not a
    finite number, or cannot run in worker processes. The message names the function (as
    ``module:function``) and the row's index; fix the function, or the row it names.

    Example: ``score_rows(my_reward, rows)`` where ``my_reward`` reads ``row["solution"]``
    and row 3 lacks it: ``reward my_module:my_reward raised on row 3 (...): KeyError: ...``.
    """


class NonFiniteError(FlowgraphError):
    """A trainer reported a NaN or infinite loss or metric (``runtime.on_nonfinite:
    error``, the default). The message names the model, episode and global step; the
    checkpoint before it is intact. ``runtime.on_nonfinite: skip`` drops such steps."""


class ProfileError(FlowgraphError):
    """``flowc profile`` cannot measure the script: a profiled run failed (the message
    quotes its last lines), batch sizes too small to measure at two sizes, or too few
    episodes.

    Example: ``flowc profile train.py --episodes 1 --out p.json``: at least 2 episodes are
    needed, the first one warms up.
    """


class PlanError(FlowgraphError):
    """The compiler cannot place or schedule the flows on the given devices."""


class LayoutError(PlanError):
    """One placement does not fit: ``reason`` says why, ``fix`` what to change.

    Automatic placement lists the reasons of every layout it rejected.
    """

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(f"{reason}: {fix}")
        self.reason = reason
        self.fix = fix

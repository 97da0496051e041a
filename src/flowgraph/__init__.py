"""flowgraph: train several cooperating models from plain Python flows.

Public API::

    from flowgraph import init, Engine, Environment, Trainer, Evaluator, TorchModule
"""

from flowgraph.config import Config, init
from flowgraph.engine import Engine, Environment, Evaluator, Trainer
from flowgraph.errors import (
    ConfigError,
    DataError,
    EngineError,
    FlowgraphError,
    ParameterSyncError,
    PlanError,
    TraceError,
)
from flowgraph.module import BaseModule, DeepSpeedModule, TorchModule

__all__ = [
    "BaseModule",
    "Config",
    "DeepSpeedModule",
    "ConfigError",
    "DataError",
    "Engine",
    "EngineError",
    "Environment",
    "Evaluator",
    "FlowgraphError",
    "ParameterSyncError",
    "PlanError",
    "TorchModule",
    "TraceError",
    "Trainer",
    "init",
]
__version__ = "0.1.0"

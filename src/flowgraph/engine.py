"""``Engine`` and its three parts: ``Environment``, ``Trainer``, ``Evaluator``.

Each part holds one flow function; the Engine traces them when it is built, so a flow's
mistakes surface at the user's line before anything runs::

    env = Environment(env_flow)
    trainer = Trainer(trainer_flow)
    evaluator = Evaluator(eval_flow).set_dataset(val_prompts)
    engine = Engine(env, trainer, evaluator) \\
             .set_parameter_sync(ppo_policy, policy) \\
             .set_dataset(train_prompts)
    engine.learn()
"""

from __future__ import annotations

import contextvars
import logging
import os
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch

from flowgraph.compiler import cost
from flowgraph.compiler.cluster import ClusterSpec
from flowgraph.compiler.graph import TRAIN_METHOD, Graph
from flowgraph.compiler.pipeline import ModelFacts, Program, compile_plan
from flowgraph.compiler.plan import Plan
from flowgraph.compiler.profile import Profile
from flowgraph.compiler.trace import TracedFlow, bind_module, trace_flow
from flowgraph.config import Config, check_directories, current_config
from flowgraph.data import Batch, Dataset, DataSource, checked_source
from flowgraph.errors import (
    ConfigError,
    EngineError,
    FlowDefinitionError,
    did_you_mean,
)
from flowgraph.module import BaseModule
from flowgraph.runtime import launch
from flowgraph.runtime.backends import effective_backend
from flowgraph.runtime.job import Job
from flowgraph.runtime.telemetry import EpisodeRecord

log = logging.getLogger("flowgraph")
# The script flowc is importing (flowgraph.loader): learn() must not train during it.
IMPORTING: contextvars.ContextVar[str | None] = contextvars.ContextVar("importing", default=None)


class _FlowHolder:
    """A flow function, traced once on first use."""

    role = "flow"

    def __init__(self, flow: Callable[[Any], Any]) -> None:
        if not callable(flow):
            raise EngineError(
                f"{type(self).__name__}(flow): flow must be a function taking one batch, got "
                f"{type(flow).__name__}; e.g. {type(self).__name__}(env_flow)"
            )
        self.flow = flow
        self._traced: TracedFlow | None = None

    @property
    def traced(self) -> TracedFlow:
        if self._traced is None:
            self._traced = trace_flow(self.flow)
            self._check(self._traced.graph)
        return self._traced

    def _check(self, graph: Graph) -> None:
        for node in graph.calls():
            if node.method == TRAIN_METHOD:
                raise FlowDefinitionError(
                    f"{node.source}: {node.target} in {self.role} flow {graph.name}; training "
                    "belongs in the Trainer flow (the Environment and Evaluator only infer)"
                )


class Environment(_FlowHolder):
    """The inference flow that turns dataset samples into training data (the episode's
    ``StreamDataset``: what the flow returns, per sample).

    Example::

        def env_flow(batch):
            policy_out = policy.forward_step(batch)
            return reward.forward_step(policy_out)
        env = Environment(env_flow)
    """

    role = "Environment"


class Trainer(_FlowHolder):
    """The training flow: each ``model.train_step(batch)`` in it receives, once per global
    step, the list of micro-batches of that step.

    Example::

        def trainer_flow(batch):
            ppo_policy.train_step(batch)
            ppo_value.train_step(batch)
        trainer = Trainer(trainer_flow)
    """

    role = "Trainer"

    def _check(self, graph: Graph) -> None:
        if not any(n.method == TRAIN_METHOD for n in graph.calls()):
            raise FlowDefinitionError(
                f"Trainer flow {graph.name} calls no train_step; call model.train_step(batch) "
                "for every model it trains"
            )


class Evaluator(_FlowHolder):
    """The evaluation flow and its dataset. Override ``post_process`` (or pass it) to turn
    the flow's outputs into metrics.

    Example::

        def eval_flow(batch):
            return reward.eval_step(policy.eval_step(batch))
        evaluator = Evaluator(eval_flow).set_dataset(val_prompts)
    """

    role = "Evaluator"

    def __init__(
        self,
        flow: Callable[[Any], Any],
        post_process: Callable[[list[Batch]], Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__(flow)
        self.samples: list[Any] | None = None
        if post_process is not None:
            self.post_process = post_process  # type: ignore[method-assign]

    def set_dataset(self, samples: DataSource) -> Evaluator:
        """Use ``samples`` (dicts or strings, or a dataset file's path, as for
        ``Engine.set_dataset``) as the evaluation set; returns ``self``.
        ``runtime.eval_data_path`` overrides it."""
        self.samples = checked_source(samples, "Evaluator dataset")
        return self

    def post_process(self, results: list[Batch]) -> dict[str, Any]:
        """Metrics from the flow's outputs (one dict batch per micro-batch).

        Default: ``num_samples`` and the mean of every per-sample float value (1-D
        floating-point tensors, e.g. ``reward``).
        """
        metrics: dict[str, Any] = {"num_samples": sum(_rows(r) for r in results)}
        keys = dict.fromkeys(k for r in results for k in r)
        for key in keys:
            values = [r[key] for r in results if isinstance(r.get(key), torch.Tensor)]
            if len(values) == len(results) and all(
                v.dim() == 1 and v.is_floating_point() for v in values
            ):
                metrics[key] = float(torch.cat(values).mean())
        return metrics


def _rows(batch: Batch) -> int:
    first = next(iter(batch.values()), [])
    return len(first)


class Engine:
    """Trains models with an environment flow, a trainer flow and an optional evaluator.

    Subclass it to package a flow (``super().__init__(env, trainer)``), or use it directly.
    ``learn()`` runs ``runtime.num_episode`` episodes with the configuration set by
    ``flowgraph.init()`` and returns one ``EpisodeRecord`` per episode.

    Example::

        engine = Engine(Environment(env_flow), Trainer(trainer_flow)) \\
                 .set_parameter_sync(ppo_policy, policy) \\
                 .set_dataset(["1+1=", "2+3="])
        for record in engine.learn():
            print(record)
    """

    def __init__(
        self,
        environment: Environment | None = None,
        trainer: Trainer | None = None,
        evaluator: Evaluator | None = None,
    ) -> None:
        self.environment = _expect(environment, Environment, "environment")
        self.trainer = _expect(trainer, Trainer, "trainer")
        if self.environment is None and self.trainer is None:
            raise EngineError("Engine needs an Environment, a Trainer or both")
        self.evaluator: Evaluator | None = None
        self.modules: dict[str, BaseModule] = {}
        self.syncs: list[tuple[BaseModule, BaseModule]] = []
        self.samples: list[Any] | None = None
        self.learned = False  # learn() runs once per Engine
        for part in (self.environment, self.trainer):
            if part is not None:
                self._adopt(part.traced)
        if self.environment is not None and self.trainer is not None:
            graph = self.environment.traced.graph
            if graph.returned is None:
                raise FlowDefinitionError(
                    f"Environment flow {graph.name} returns nothing, but the Trainer needs its "
                    "data: return the last model output, e.g. return reward_out"
                )
        if evaluator is not None:
            self.set_evaluator(evaluator)

    def _adopt(self, traced: TracedFlow) -> None:
        for module in traced.modules.values():
            bind_module(self.modules, module, f"in flow {traced.graph.name}")

    def set_evaluator(self, evaluator: Evaluator) -> Engine:
        """Evaluate with ``evaluator`` every ``runtime.eval_episode_interval`` episodes."""
        self.evaluator = _expect(evaluator, Evaluator, "evaluator")
        self._adopt(evaluator.traced)
        return self

    def set_dataset(self, samples: DataSource) -> Engine:
        """Train on ``samples``: a list of dicts (str -> tensor, number, str, list) or
        strs, or the path of a dataset file (``.jsonl``, ``.json``, ``.parquet``,
        ``.csv``) or ``datasets.save_to_disk`` directory, memory-mapped when the run
        starts. ``runtime.data_path`` overrides it.

        Example::

            engine.set_dataset("prompts.jsonl")        # {"prompt": ...} per line
            engine.set_dataset([{"prompt": "1+1="}])  # or the rows themselves
        """
        self.samples = checked_source(samples, "Engine dataset")
        return self

    def set_parameter_sync(self, src: BaseModule, dst: BaseModule) -> Engine:
        """Copy ``src``'s trained weights into ``dst`` after training (every
        ``models.<dst>.sync_frequency`` episodes) and once before the first episode."""
        for side, module in (("src", src), ("dst", dst)):
            if not isinstance(module, BaseModule):
                raise EngineError(
                    f"set_parameter_sync: {side} is a {type(module).__name__}, not a "
                    "BaseModule; pass the module objects used in the flows, e.g. "
                    "set_parameter_sync(ppo_policy, policy)"
                )
            if self.modules.get(module.name) is not module:
                raise EngineError(
                    f"set_parameter_sync: {module!r} is not called by any flow of this Engine "
                    f"(its models: {', '.join(self.modules) or 'none'})"
                )
        if src is dst:
            raise EngineError(f"set_parameter_sync({src.name}, {dst.name}): src and dst are one")
        for s, d in self.syncs:
            if d is dst:
                raise EngineError(
                    f"set_parameter_sync: {dst.name} already receives from {s.name}; a model "
                    "receives parameters from one source"
                )
        self.syncs.append((src, dst))
        return self

    def graphs(self) -> dict[str, Graph]:
        """The traced graphs by role: ``env``, ``trainer``, ``eval``."""
        parts = {"env": self.environment, "trainer": self.trainer, "eval": self.evaluator}
        return {role: p.traced.graph for role, p in parts.items() if p is not None}

    def __str__(self) -> str:
        return "\n\n".join(str(g) for g in self.graphs().values())

    def _trained_by_flow(self) -> dict[str, str]:
        """Models whose ``train_step`` the Trainer flow calls, with the call's source line."""
        if self.trainer is None:
            return {}
        graph = self.trainer.traced.graph
        return {n.model: n.source for n in graph.calls() if n.method == TRAIN_METHOD}

    def trainable_models(self, config: Config) -> list[str]:
        """Models a Trainer flow trains, plus those with ``trainable: true``."""
        trained = set(self._trained_by_flow())
        chosen = {name: config.model(name).trainable for name in self.modules}
        return [
            name
            for name, setting in chosen.items()
            if (name in trained if setting is None else setting)
        ]

    def program(self, config: Config, eval_data: Dataset | None = None) -> Program:
        """What the compiler needs: graphs, plain facts about every model, syncs
        (``eval_data``: the evaluation set when the caller has opened it already)."""
        self.check_config(config)
        trainable = set(self.trainable_models(config))
        if eval_data is None:
            eval_data = self._eval_data(config, required=False)
        return Program(
            graphs=self.graphs(),
            models={
                name: _facts(module, config, name in trainable)
                for name, module in self.modules.items()
            },  # fmt: skip
            syncs=tuple((src.name, dst.name) for src, dst in self.syncs),
            eval_samples=len(eval_data) if eval_data else 0,
        )

    def compile(self, cluster: ClusterSpec, config: Config | None = None) -> Plan:
        """The plan for ``cluster`` (``flowc compile`` prints it); pure, launches nothing.

        Example::

            plan = engine.compile(ClusterSpec.from_world_size(8))
            print(plan.placement_table())
        """
        config = config or current_config()
        return compile_plan(self.program(config), config, cluster, _profile(config))

    def check_config(self, config: Config) -> None:
        """Reject ``models.<name>`` sections for names no flow of this Engine calls, and
        fp16 trainers (their gradients would need loss scaling)."""
        for name in config.models:
            if name not in self.modules:
                raise ConfigError(
                    f"models.{name}: no model named {name!r} in this Engine; "
                    f"{did_you_mean(name, self.modules)}"
                    f"its models are: {', '.join(self.modules)}"
                )
        if config.runtime.eval_data_path and self.evaluator is None:
            raise ConfigError(
                "runtime.eval_data_path is set, but this Engine has no Evaluator to run on it: "
                "remove the setting, or pass Engine(env, trainer, Evaluator(eval_flow))"
            )
        for name, source in self._trained_by_flow().items():
            if config.model(name).trainable is False:
                raise ConfigError(
                    f"models.{name}.trainable is false, but the Trainer flow calls "
                    f"{name}.train_step ({source}): remove trainable: false, or the call"
                )
        self._check_sync_directions(config)
        for name in self.trainable_models(config):
            if config.model(name).precision == "fp16":
                raise ConfigError(
                    f"models.{name}.precision: fp16 on a trainer would need loss scaling "
                    "inside its train_step; use precision: bf16 (fp32 master weights, bf16 "
                    "compute), or fp32"
                )

    def _check_sync_directions(self, config: Config) -> None:
        """A sync copies a trained model into an inference copy: its source must train and
        its destination must not (else the copy overwrites the trained weights)."""
        trainable = set(self.trainable_models(config))
        for src, dst in self.syncs:
            call = f"set_parameter_sync({src.name}, {dst.name})"
            if src.name not in trainable and dst.name in trainable:
                raise EngineError(
                    f"{call}: the arguments are swapped: {dst.name} is the trained model and "
                    f"{src.name} its copy, so every sync would overwrite the trained weights "
                    f"with the untrained ones; write set_parameter_sync({dst.name}, {src.name})"
                )
            if src.name not in trainable:
                raise EngineError(
                    f"{call}: {src.name} is not trained (no train_step of it in the Trainer "
                    f"flow, no models.{src.name}.trainable: true), so there is nothing to copy: "
                    "the source is the model the Trainer flow trains"
                )
            if dst.name in trainable:
                raise EngineError(
                    f"{call}: {dst.name} is trained too, and each sync would overwrite its "
                    f"training; the destination is an inference copy (a model the env or eval "
                    "flow calls, never train_step)"
                )

    def learn(self) -> list[EpisodeRecord]:
        """Run all episodes (in this process, or as this rank of a torchrun job) and
        return their records (on rank 0; other ranks return [])."""
        script = IMPORTING.get()
        if script is not None:
            raise EngineError(
                f"{_caller_line(script)} calls learn() when the script is imported; flowc "
                "imports scripts to read their Engine and never trains: put the call under "
                '`if __name__ == "__main__":` (python FILE still runs it)'
            )
        if self.learned:
            raise EngineError(
                "learn() already ran on this Engine: its modules hold the trained weights, "
                "and a second run would set them up (re-initialise them) again. To train "
                "longer, raise runtime.num_episode with a runtime.checkpoint_dir and run "
                "the script again (it resumes from the checkpoint), or build new modules "
                "and a new Engine for a fresh run"
            )
        config = current_config()
        self.check_config(config)
        train_source = config.runtime.data_path or self.samples
        if train_source is None:
            raise EngineError(
                "no training data: call engine.set_dataset(train_prompts) first, or set "
                "runtime.data_path=FILE"
            )
        eval_data = self._eval_data(config)  # opened once: the plan and the run share it
        program = self.program(config, eval_data)
        seed = config.runtime.seed
        what = "runtime.data_path" if config.runtime.data_path else "Engine dataset"
        job = Job(
            config=config,
            modules=self.modules,
            dataset=Dataset(train_source, seed=seed, what=what),
            eval_dataset=eval_data,
            post_process=self.evaluator.post_process if self.evaluator else None,
            on_setup=self._mark_learned,
        )
        if self.evaluator is not None:
            self._warn_if_never_evaluated(config)
        check_directories(config.runtime)
        profile = _profile(config)
        return launch.run(job, lambda cluster: compile_plan(program, config, cluster, profile))

    def _eval_data(self, config: Config, required: bool = True) -> Dataset | None:
        """The evaluation set: ``runtime.eval_data_path``, else the Evaluator's own (None
        without an Evaluator, or, unless ``required``, without a dataset)."""
        if self.evaluator is None:
            return None
        path = config.runtime.eval_data_path
        if path is None and self.evaluator.samples is None:
            if not required:
                return None
            raise EngineError(
                "the Evaluator has no dataset: Evaluator(eval_flow).set_dataset(val_prompts), "
                "or set runtime.eval_data_path=FILE"
            )
        what = "runtime.eval_data_path" if path else "Evaluator dataset"
        return Dataset(path or self.evaluator.samples, seed=config.runtime.seed, what=what)

    def _mark_learned(self) -> None:
        """From the first setup() on, the modules are this run's: learn() does not repeat."""
        self.learned = True

    @staticmethod
    def _warn_if_never_evaluated(config: Config) -> None:
        runtime = config.runtime
        if runtime.eval_episode_interval == 0 and not runtime.enable_eval_before_training:
            log.warning(
                "an Evaluator is set but runtime.eval_episode_interval is 0, so it never "
                "runs; set runtime.eval_episode_interval=N to evaluate every N episodes"
            )


def _caller_line(script: str) -> str:
    """``train.py:40``: the line of ``script`` on the current stack (the learn() call)."""
    for frame in reversed(traceback.extract_stack()):
        if os.path.realpath(frame.filename) == script:
            return f"{os.path.basename(script)}:{frame.lineno}"
    return os.path.basename(script)


def _facts(module: BaseModule, config: Config, trainable: bool) -> ModelFacts:
    """What the compiler needs to know of ``module``, from the module and its config."""
    settings = config.model(module.name)
    params = (
        cost.parse_params(settings.params, module.name)
        if settings.params is not None
        else module.measure_params(config)
    )
    return ModelFacts(
        name=module.name,
        params=params,
        backend=effective_backend(module, settings),
        zero_stage=settings.zero_stage,
        trainable=trainable,
        offload=settings.offload,
        precision=settings.precision,
    )


def _expect(value: Any, kind: type, what: str) -> Any:
    if value is not None and not isinstance(value, kind):
        raise EngineError(
            f"Engine {what} must be a {kind.__name__} or None, got {type(value).__name__}; "
            f"wrap the flow function: {kind.__name__}({what}_flow)"
        )
    return value


def _profile(config: Config) -> Profile | None:
    """The measured costs ``runtime.profile`` names (flowc profile), if any."""
    path = config.runtime.profile
    return Profile.load(path) if path else None

"""Configuration: pydantic models for ``runtime`` and ``models.<name>``.

A config comes from a YAML file, a dict or a ``Config``, plus ``key=value`` overrides::

    >>> cfg = load_config({"runtime": {"num_episode": 2}}, ["models.policy.num_gpu=2"])
    >>> cfg.runtime.num_episode, cfg.models["policy"].num_gpu
    (2, 2)

Unknown keys, wrong types and inconsistent batch sizes raise ``ConfigError`` with the
key's full path, the value given and the valid choices. ``flowgraph.init()`` makes a
config the current one for the process; ``current_config()`` returns it (defaults when
``init`` was never called).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flowgraph.errors import ConfigError, did_you_mean

_STRICT = ConfigDict(extra="forbid", validate_assignment=True)


class RuntimeConfig(BaseModel):
    """Settings of the whole run (the ``runtime:`` section)."""

    model_config = _STRICT

    num_episode: int = Field(1, ge=1, description="Episodes to run.")
    sample_per_episode: int = Field(
        16, ge=1, description="Dataset samples drawn per episode and streamed through the env."
    )
    generation_batch_size: int = Field(
        8, ge=1, description="Micro-batch size of env and eval flows."
    )
    num_inference_per_prompt: int = Field(
        1,
        ge=1,
        description="Rows the env flow makes of each prompt (GRPO's group size); training "
        "sees sample_per_episode x this many rows per episode.",
    )
    train_micro_batch_size: int = Field(
        8, ge=1, description="Samples per training micro-batch (per data-parallel rank)."
    )
    train_global_batch_size: int | None = Field(
        None,
        ge=1,
        description="Samples per optimizer step, summed over micro-batches and ranks; "
        "default: every row of the episode.",
    )
    num_training_epoch: int = Field(1, ge=1, description="Passes over each episode's data.")
    eval_episode_interval: int = Field(
        0, ge=0, description="Evaluate after every N-th episode (0 = never)."
    )
    enable_eval_before_training: bool = Field(
        False, description="Also evaluate once before the first episode."
    )
    save_episode_interval: int = Field(
        0,
        ge=0,
        description="Checkpoint after every N-th episode (0 = never); needs checkpoint_dir.",
    )
    checkpoint_dir: str | None = Field(
        None, description="Where checkpoints are written and resumed from."
    )
    max_checkpoints: int = Field(3, ge=1, description="Newest checkpoints kept.")
    checkpoint_checksums: bool = Field(
        False,
        description="Record every checkpoint file's CRC32 and check it before loading "
        "(catches bit flips that a size check cannot; costs a pass over the bytes).",
    )
    resume: bool = Field(
        True,
        description="Resume from the newest checkpoint in checkpoint_dir when there is one "
        "(false: start afresh; checkpoints then overwrite the old ones).",
    )
    seed: int = Field(1234, description="Seed of data order and of every rank's RNGs.")
    max_staleness: int = Field(
        0,
        ge=0,
        description="Asynchronous rollout: episode e generates with the inference weights "
        "synced after episode e-1-k (k = this), so generating episode e+k overlaps training "
        "episode e on disjoint devices; 0 = on-policy. The weights behind every sample are a "
        "function of the episode number, not of timing (docs/async.md).",
    )
    colocation: list[list[str]] | Literal["auto"] = Field(
        default_factory=list,
        description="Groups of model names that share devices, or 'auto'.",
    )
    timeout_s: float = Field(
        60.0, gt=0, description="Seconds before a silent rank is reported as stuck."
    )
    log_dir: str | None = Field(None, description="Where metrics.jsonl is written.")
    data_path: str | None = Field(
        None,
        description="Train on this dataset file (.jsonl, .json, .parquet, .csv) or "
        "datasets.save_to_disk directory instead of what the script passed to "
        "Engine.set_dataset; memory-mapped, not loaded per rank.",
    )
    eval_data_path: str | None = Field(
        None,
        description="Evaluate on this dataset file or directory instead of what the script "
        "passed to Evaluator.set_dataset (needs an Evaluator).",
    )
    prompt_length: int = Field(
        512, ge=1, description="Tokens per prompt, for the compiler's cost model."
    )
    response_length: int = Field(
        512, ge=0, description="Tokens generated per sample, for the compiler's cost model."
    )
    validate_sync: bool = Field(
        False,
        description="After every parameter sync, compare checksums of source and "
        "destination and name any parameter that differs (costs a pass over the weights).",
    )
    check_merges: bool = Field(
        False,
        description="Compare the values of a key that a model receives from several inputs "
        "(not only their shapes and dtypes), so that unequal values are an error even after "
        "a transfer between ranks (costs milliseconds per merge; tests turn it on).",
    )
    sync_bucket_mb: int = Field(
        256, ge=1, description="Size of the buckets that parameter sync broadcasts across meshes."
    )
    on_nonfinite: Literal["error", "skip"] = Field(
        "error",
        description="A NaN or infinite trainer metric (loss, grad norm): error = stop, naming "
        "model, episode and step (the last checkpoint stays intact); skip = drop that step "
        "(the flowgraph.rl trainers skip its optimizer step) and warn.",
    )
    log_episodes: bool = Field(True, description="Print one line per episode.")
    trace: bool = Field(
        False,
        description="Write a timeline of every rank's instructions to log_dir/trace.json "
        "(Chrome trace format: open it in Perfetto or chrome://tracing).",
    )
    tensorboard: bool = Field(
        True,
        description="Also write the episode metrics to log_dir/tensorboard when the "
        "tensorboard package is installed.",
    )
    progress: bool = Field(True, description="Show a progress bar of the episodes (rank 0).")
    profile: str | None = Field(
        None,
        description="A profile written by `flowc profile` (PROFILE.json): plan with its "
        "measured costs instead of the analytical model, in `learn()` as in `flowc compile`.",
    )

    @model_validator(mode="after")
    def _batch_sizes_agree(self) -> RuntimeConfig:
        if self.trace and not self.log_dir:
            raise ValueError(
                "trace=true writes log_dir/trace.json: set runtime.log_dir (e.g. "
                "runtime.log_dir=runs/trace)"
            )
        if self.save_episode_interval and not self.checkpoint_dir:
            raise ValueError(
                f"save_episode_interval={self.save_episode_interval} needs a place to write: "
                "set runtime.checkpoint_dir (e.g. runtime.checkpoint_dir=runs/ckpt)"
            )
        global_bs = self.train_global_batch_size
        if global_bs is None:
            return self
        if global_bs % self.train_micro_batch_size:
            raise ValueError(
                f"train_global_batch_size ({global_bs}) must be a multiple of "
                f"train_micro_batch_size ({self.train_micro_batch_size}); "
                f"e.g. set train_global_batch_size="
                f"{max(1, global_bs // self.train_micro_batch_size) * self.train_micro_batch_size}"
            )
        if global_bs > self.rows_per_episode:
            raise ValueError(
                f"train_global_batch_size ({global_bs}) must not exceed the rows of an episode "
                f"(sample_per_episode {self.sample_per_episode} x num_inference_per_prompt "
                f"{self.num_inference_per_prompt}): an episode would not fill one optimizer step"
            )
        return self

    @property
    def rows_per_episode(self) -> int:
        """Training rows an episode produces: prompts times answers per prompt."""
        return self.sample_per_episode * self.num_inference_per_prompt

    @property
    def global_batch_size(self) -> int:
        """``train_global_batch_size`` with its default applied."""
        return self.train_global_batch_size or self.rows_per_episode


class ModelConfig(BaseModel):
    """Settings of one model (the ``models.<name>:`` section)."""

    model_config = _STRICT

    num_gpu: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Devices in this model's mesh, or 'auto' for the compiler."
    )
    trainable: bool | None = Field(
        None, description="Force trainable; default: trained when a Trainer flow calls it."
    )
    generation_batch_size: int | None = Field(
        None, ge=1, description="Largest batch this model is called with (chunks larger ones)."
    )
    sync_frequency: int = Field(
        1, ge=1, description="Receive parameter sync after every N-th episode."
    )
    backend: Literal["torch", "deepspeed"] = Field(
        "torch",
        description="Training backend: torch (DDP on the mesh) or deepspeed (needs a "
        "DeepSpeedModule; a DeepSpeedModule always uses it).",
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(
        0, description="DeepSpeed ZeRO stage (3 needs the trainer's mesh to span every rank)."
    )
    offload: bool = Field(False, description="Free device memory between stages.")
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        "fp32",
        description="Compute dtype: inference models are cast to it (weights, KV cache); "
        "trainers keep fp32 weights and optimizer states and compute under autocast "
        "(bf16 or fp32 only); auto: bf16 where the device computes it natively "
        "(docs/precision.md).",
    )
    params: str | int | None = Field(
        None, description="Parameter count for the cost model, e.g. 7B or 350M."
    )
    args: dict[str, Any] = Field(
        default_factory=dict, description="Free-form arguments for the user's module."
    )


class Config(BaseModel):
    """The whole configuration: ``runtime`` plus one ``ModelConfig`` per model name."""

    model_config = _STRICT

    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    models: dict[str, ModelConfig] = Field(default_factory=dict)

    def model(self, name: str) -> ModelConfig:
        """The settings of model ``name`` (defaults when the config does not mention it)."""
        return self.models.get(name) or ModelConfig()

    def __str__(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False).rstrip()


def load_config(
    config: str | Path | Mapping[str, Any] | Config | None = None,
    overrides: Iterable[str] = (),
) -> Config:
    """Build a ``Config`` from a YAML path, a dict or a ``Config``, then apply overrides.

    ``overrides`` are ``"section.key=value"`` strings; values are parsed as YAML
    (``3``, ``true``, ``[a, b]``). Raises ``ConfigError`` naming the key on any problem.
    """
    data = _as_dict(config)
    for override in _overrides(overrides):
        _apply_override(data, override)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, data)) from None


def _as_dict(config: str | Path | Mapping[str, Any] | Config | None) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Config):
        return config.model_dump(exclude_unset=True)
    if isinstance(config, Mapping):
        return _deep_copy(config)
    if not isinstance(config, (str, Path)):
        raise ConfigError(
            f"a config is a YAML path, a dict or a Config, got {type(config).__name__}: "
            "pass e.g. flowgraph.init('train.yaml') or flowgraph.init({'runtime': {...}})"
        )
    path = Path(config)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory: name the YAML file in it")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping with 'runtime:' and 'models:', "
            f"got {type(data).__name__}"
        )
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (plain
    YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may repeat keys
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str | int | float | bool | None):
                continue  # unhashable: SafeLoader's own construct_mapping reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None,
                    f"key {key!r} appears twice in one section (lines {seen[key]} and {line}): "
                    "keep one of them",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _overrides(overrides: Iterable[str]) -> list[str]:
    """The overrides as a list of ``key=value`` strings (one string alone is a mistake:
    iterating it would give characters)."""
    if isinstance(overrides, (str, bytes)):
        raise ConfigError(
            f"overrides must be a list of key=value strings, got the string {overrides!r}: "
            f"write [{overrides!r}]"
        )
    items = list(overrides)
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(
                f"override {item!r} is a {type(item).__name__}, not a key=value string; "
                "write e.g. 'runtime.num_episode=3'"
            )
    return items


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            f"override {override!r} is not key=value; write e.g. runtime.num_episode=3"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"override {override!r}: {where} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _describe(err: ValidationError, data: Mapping[str, Any]) -> str:
    problems: dict[str, list[str]] = {}
    given: dict[str, Any] = {}
    for problem in err.errors():
        loc, value = _key_path([str(p) for p in problem["loc"]], data)
        where = ".".join(loc) or "config"
        if problem["type"] == "extra_forbidden":
            text, value = f"unknown key; {_valid_keys_hint(loc)}", None
        elif problem["type"] == "value_error":  # our validators quote the values themselves
            text, value = str(problem["msg"]).removeprefix("Value error, "), None
        else:
            text = str(problem["msg"])
        problems.setdefault(where, []).append(text)
        given[where] = value
    lines = ["invalid configuration:"]
    for where, texts in problems.items():
        got = "" if given[where] is None else f" (got {given[where]!r})"
        lines.append(f"  {where}: {' or '.join(dict.fromkeys(texts))}{got}")
    return "\n".join(lines)


def _key_path(loc: list[str], data: Mapping[str, Any]) -> tuple[list[str], Any]:
    """The part of a pydantic error location that names keys of the user's data, and the
    value found there (pydantic appends union member tags such as ``int``)."""
    path: list[str] = []
    node: Any = data
    for part in loc:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            if isinstance(node, Mapping):
                return [*path, part], None  # a key pydantic expected but the data lacks
            break
        path.append(part)
    return path, node


def _valid_keys_hint(loc: list[str]) -> str:
    model = _section_model(loc[:-1])
    if model is None:
        return "check the spelling"
    valid = list(model.model_fields)
    return f"{did_you_mean(loc[-1], valid)}valid keys: {', '.join(valid)}"


def _section_model(section: list[str]) -> type[BaseModel] | None:
    if not section:
        return Config
    if section == ["runtime"]:
        return RuntimeConfig
    if len(section) == 2 and section[0] == "models":
        return ModelConfig
    return None


_current: Config | None = None


def init(
    config: str | Path | Mapping[str, Any] | Config | None = None,
    overrides: Iterable[str] = (),
) -> Config:
    """Make a configuration the current one for this process; call once before ``learn()``.

    Example::

        import sys, flowgraph
        flowgraph.init("train.yaml", sys.argv[1:])   # e.g. runtime.num_episode=3
    """
    global _current
    _current = load_config(config, overrides)
    return _current


def init_from_argv(argv: list[str], default_config: str | Path) -> Config:
    """``init()`` from a script's command line: ``[--config FILE] [key=value ...]``, with
    ``default_config`` when no ``--config`` is given.

    Example::

        init_from_argv(sys.argv[1:], Path(__file__).with_name("ppo.yaml"))
    """
    if argv[:1] == ["--config"]:
        if len(argv) < 2:
            raise ConfigError("--config needs a file: --config FILE [key=value ...]")
        return init(argv[1], argv[2:])
    return init(default_config, argv)


def current_config() -> Config:
    """The configuration set by ``init()``, or the defaults when it was never called."""
    return _current if _current is not None else Config()


def reset_config() -> None:
    """Forget the configuration set by ``init()`` (tests use this)."""
    global _current
    _current = None


def check_directories(runtime: RuntimeConfig) -> None:
    """Refuse a ``checkpoint_dir`` or ``log_dir`` that exists as a file (found before any
    work, rather than by the first write after an episode)."""
    for key in ("checkpoint_dir", "log_dir"):
        value = getattr(runtime, key)
        if value and Path(value).exists() and not Path(value).is_dir():
            raise ConfigError(
                f"runtime.{key}: {value!r} is a file, not a directory; name a directory "
                f"(it is created when missing), e.g. runtime.{key}={value}.d"
            )


def reference_markdown() -> str:
    """The config reference (docs/config.md's tables), rendered from the models' fields."""
    out = []
    for title, model in (("runtime", RuntimeConfig), ("models.<name>", ModelConfig)):
        out += [
            f"### `{title}`",
            "",
            "| key | type | default | meaning |",
            "| --- | --- | --- | --- |",
        ]
        for key, info in model.model_fields.items():
            default = info.default_factory() if info.default_factory else info.default
            kind = _type_name(info.annotation).replace("|", "\\|")
            out.append(f"| `{key}` | `{kind}` | `{default!r}` | {info.description} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _type_name(annotation: Any) -> str:
    """``int | Literal['auto']`` -> ``int | 'auto'``, for the docs."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (Union, UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not args:
        return annotation.__name__
    return str(annotation).replace("typing.", "")

"""Config: YAML, dicts, overrides, and messages for every kind of mistake."""

import pytest

import flowgraph
from flowgraph.config import Config, current_config, load_config
from flowgraph.errors import ConfigError


def test_defaults_without_init():
    cfg = current_config()
    assert cfg.runtime.num_episode == 1 and cfg.models == {}
    assert cfg.model("anything").sync_frequency == 1


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "runtime:\n  num_episode: 2\n  sample_per_episode: 8\n"
        "models:\n  policy:\n    num_gpu: 2\n    args: {temperature: 0.7}\n"
    )
    cfg = flowgraph.init(
        path,
        ["runtime.num_episode=5", "models.policy.args.top_k=4", "models.value.backend=deepspeed",
         "runtime.colocation=[[policy, reference]]"],
    )  # fmt: skip
    assert current_config() is cfg
    assert cfg.runtime.num_episode == 5 and cfg.runtime.sample_per_episode == 8
    assert cfg.models["policy"].num_gpu == 2
    assert cfg.models["policy"].args == {"temperature": 0.7, "top_k": 4}
    assert cfg.models["value"].backend == "deepspeed"
    assert cfg.runtime.colocation == [["policy", "reference"]]
    assert cfg.runtime.global_batch_size == 8  # defaults to sample_per_episode


def test_config_round_trips_through_its_text():
    cfg = load_config({"runtime": {"seed": 3}, "models": {"policy": {"num_gpu": 4}}})
    assert load_config(__import__("yaml").safe_load(str(cfg))) == cfg
    assert load_config(cfg) == cfg


@pytest.mark.parametrize(
    ("config", "overrides", "fragments"),
    [
        ({"runtime": {"num_episod": 3}}, [],
         ["runtime.num_episod: unknown key; did you mean 'num_episode'?",
          "valid keys: num_episode"]),
        ({}, ["models.policy.backend=deepspeeed"],
         ["models.policy.backend: Input should be 'torch' or 'deepspeed'", "got 'deepspeeed'"]),
        ({"runtme": {}}, [], ["runtme: unknown key; did you mean 'runtime'?"]),
        ({"runtime": {"sample_per_episode": 0}}, [],
         ["runtime.sample_per_episode: Input should be greater than or equal to 1 (got 0)"]),
        ({"runtime": {"train_micro_batch_size": 3, "train_global_batch_size": 8}}, [],
         ["train_global_batch_size (8) must be a multiple of train_micro_batch_size (3)"]),
        ({"runtime": {"sample_per_episode": 4, "train_global_batch_size": 8,
                      "train_micro_batch_size": 4}}, [],
         ["train_global_batch_size (8) must not exceed the rows of an episode "
          "(sample_per_episode 4 x num_inference_per_prompt 1)"]),
        ({"models": {"policy": {"num_gpu": 0}}}, [],
         ["models.policy.num_gpu: Input should be greater than or equal to 1 or Input "
          "should be 'auto' (got 0)"]),
        ({"models": {"policy": {"num_gpu": "many"}}}, [], ["models.policy.num_gpu", "'many'"]),
        ({"models": {"policy": {"zero_stage": 4}}}, [], ["models.policy.zero_stage", "got 4"]),
        ({}, ["runtime.num_episode"], ["override 'runtime.num_episode' is not key=value"]),
        ({}, ["runtime.seed.x=1"],
         ["runtime.seed: Input should be a valid integer (got {'x': 1})"]),
        ({}, ["runtime.num_episode=three"],
         ["runtime.num_episode: Input should be a valid integer", "got 'three'"]),
    ],
)  # fmt: skip
def test_bad_config(config, overrides, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(config, overrides)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("runtime: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


def test_assignment_is_validated():
    cfg = Config()
    with pytest.raises(ValueError):
        cfg.runtime.num_episode = 0


def test_init_from_argv_takes_a_config_flag_or_the_default(tmp_path):
    from flowgraph.config import init_from_argv

    default, other = tmp_path / "default.yaml", tmp_path / "other.yaml"
    default.write_text("runtime: {seed: 3}\n")
    other.write_text("runtime: {seed: 5}\n")
    assert init_from_argv(["runtime.num_episode=2"], default).runtime.seed == 3
    config = init_from_argv(["--config", str(other), "runtime.num_episode=2"], default)
    assert (config.runtime.seed, config.runtime.num_episode) == (5, 2)
    with pytest.raises(ConfigError, match="--config needs a file: --config FILE"):
        init_from_argv(["--config"], default)

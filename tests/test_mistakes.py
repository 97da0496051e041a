"""The catalogue of ordinary mistakes beyond the flows' (tests/test_errors.py): config
files and overrides, datasets, model outputs, hooks, parameter syncs, the run's lifecycle,
files and directories, the flowgraph.rl modules' arguments, flowc, non-finite losses.
Each case makes one mistake and asserts the flowgraph exception, the words of its cause,
and where the user's code is involved, the user's line. docs/errors.md lists the families.
"""

import inspect
import json
import logging
import textwrap
from pathlib import Path

import pytest
import torch

import flowgraph
import flowgraph.compiler.cluster
from flowgraph import Engine, Environment, Evaluator, TorchModule, Trainer
from flowgraph.cli import main as flowc
from flowgraph.config import init_from_argv, load_config
from flowgraph.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    EngineError,
    NonFiniteError,
    PlanError,
)
from flowgraph.rl.modules import GRPOTrainer, PolicyInference, RewardInference
from seed_models import PolicyInference as ToyPolicy
from seed_models import PolicyTrainer, ValueTrainer, prompts

QUIET = {"log_episodes": False, "progress": False, "tensorboard": False}
RUNTIME = {"num_episode": 1, "sample_per_episode": 4, "generation_batch_size": 4,
           "train_micro_batch_size": 2, **QUIET}  # fmt: skip


def line_of(func, text: str) -> str:
    """``test_mistakes.py:N``: the line of ``func``'s source that contains ``text``."""
    lines, start = inspect.getsourcelines(func)
    offset = next(i for i, line in enumerate(lines) if text in line)
    return f"test_mistakes.py:{start + offset}"


def raises(error, pattern: str, action, *args):
    """``action(*args)`` raises ``error`` whose message (and notes) match ``pattern``."""
    with pytest.raises(error) as info:
        action(*args)
    text = "\n".join([str(info.value), *getattr(info.value, "__notes__", [])])
    import re

    assert re.search(pattern, text, re.S), f"{pattern!r} not in:\n{text}"
    return text


def yaml_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def one_model_engine(module, trainer=None) -> Engine:
    def env_flow(batch):
        return module.forward_step(batch)

    def trainer_flow(batch):
        trainer.train_step(batch)

    return Engine(Environment(env_flow), Trainer(trainer_flow) if trainer else None)


# -- config files and overrides ------------------------------------------------------------
CONFIG_MISTAKES = [
    ("duplicate key", "runtime:\n  seed: 1\n  num_episode: 2\n  seed: 3\n",
     r"key 'seed' appears twice in one section \(lines 2 and 4\)"),
    ("duplicate model section", "models:\n  policy: {num_gpu: 1}\n  policy: {num_gpu: 2}\n",
     r"key 'policy' appears twice"),
    ("syntax error", "runtime:\n  seed: [1, 2\n", r"is not valid YAML"),
    ("top level is a list", "- runtime\n- models\n", r"must hold a mapping .* got list"),
    ("unknown section", "runtme:\n  seed: 1\n", r"runtme: unknown key; did you mean 'runtime'"),
    ("unknown runtime key", "runtime:\n  num_episodes: 3\n",
     r"runtime.num_episodes: unknown key; did you mean 'num_episode'"),
    ("unknown model key", "models:\n  policy: {num_gpus: 2}\n",
     r"models.policy.num_gpus: unknown key; did you mean 'num_gpu'"),
    ("wrong type", "runtime:\n  num_episode: many\n", r"runtime.num_episode: .*integer.*'many'"),
    ("out of range", "runtime:\n  num_episode: 0\n", r"runtime.num_episode: .*greater than"),
    ("unknown precision", "models:\n  policy: {precision: fp8}\n",
     r"models.policy.precision: .*'fp32'.*'bf16'"),
    ("negative staleness", "runtime:\n  max_staleness: -1\n", r"runtime.max_staleness"),
    ("unknown non-finite policy", "runtime:\n  on_nonfinite: ignore\n",
     r"runtime.on_nonfinite: .*'error'.*'skip'"),
    ("global batch not a multiple", "runtime:\n  train_micro_batch_size: 3\n"
     "  train_global_batch_size: 8\n", r"must be a multiple of train_micro_batch_size \(3\)"),
    ("interval without a directory", "runtime:\n  save_episode_interval: 2\n",
     r"needs a place to write: set runtime.checkpoint_dir"),
    ("trace without a log dir", "runtime:\n  trace: true\n", r"set runtime.log_dir"),
    ("colocation not a list of lists", "runtime:\n  colocation: policy\n",
     r"runtime.colocation"),
]  # fmt: skip


@pytest.mark.parametrize("text, pattern", [c[1:] for c in CONFIG_MISTAKES],
                         ids=[c[0] for c in CONFIG_MISTAKES])  # fmt: skip
def test_config_file_mistakes(tmp_path, text, pattern):
    raises(ConfigError, pattern, load_config, str(yaml_file(tmp_path, text)))


OVERRIDE_MISTAKES = [
    ("one string instead of a list", "runtime.seed=3", r"overrides must be a list .* write \["),
    ("a number in the list", [3], r"override 3 is a int, not a key=value string"),
    ("no equals sign", ["runtime.seed"], r"override 'runtime.seed' is not key=value"),
    ("a value used as a section", ["runtime.seed.x=1"], r"runtime.seed is a value, not a section"),
    ("unknown key", ["runtime.sed=1"], r"runtime.sed: unknown key; did you mean 'seed'"),
]  # fmt: skip


@pytest.mark.parametrize("overrides, pattern", [c[1:] for c in OVERRIDE_MISTAKES],
                         ids=[c[0] for c in OVERRIDE_MISTAKES])  # fmt: skip
def test_override_mistakes(overrides, pattern):
    raises(ConfigError, pattern, load_config, {"runtime": {"seed": 1}}, overrides)


def test_a_config_path_that_is_a_directory_or_missing(tmp_path):
    raises(ConfigError, r"is a directory: name the YAML file in it", load_config, str(tmp_path))
    raises(ConfigError, r"does not exist", load_config, str(tmp_path / "nope.yaml"))
    raises(ConfigError, r"a config is a YAML path, a dict or a Config, got int", load_config, 3)
    raises(ConfigError, r"--config needs a file", init_from_argv, ["--config"], "x.yaml")


def test_trainable_false_on_a_model_the_trainer_flow_trains():
    policy, trainer = ToyPolicy("policy"), PolicyTrainer("ppo_policy")
    flowgraph.init({"runtime": RUNTIME, "models": {"ppo_policy": {"trainable": False}}})
    engine = one_model_engine(policy, trainer).set_dataset(prompts(4, seed=0))
    raises(ConfigError, r"models.ppo_policy.trainable is false, but the Trainer flow calls "
           r"ppo_policy.train_step \(test_mistakes.py:\d+\)", engine.learn)  # fmt: skip


def test_colocation_mistakes():
    policy, trainer = ToyPolicy("policy"), PolicyTrainer("ppo_policy")
    engine = one_model_engine(policy, trainer).set_dataset(prompts(4, seed=0))
    flowgraph.init({"runtime": {**RUNTIME, "colocation": [["polcy", "ppo_policy"]]}})
    raises(PlanError, r"runtime.colocation names 'polcy', which no flow calls; did you mean "
           r"'policy'", engine.learn)  # fmt: skip
    flowgraph.init({"runtime": {**RUNTIME, "colocation": [["policy"], ["policy", "ppo_policy"]]}})
    raises(PlanError, r"puts 'policy' in two groups", engine.learn)


# -- datasets ----------------------------------------------------------------------------
DATASET_MISTAKES = [
    ("a sample lacks a key", [{"x": 1, "y": 2}, {"x": 1, "y": 2}, {"x": 1}],
     r"sample 2 has keys \['x'\], sample 0 has \['x', 'y'\] \(missing \['y'\]"),
    ("a sample has an extra key", [{"x": 1}, {"x": 1, "z": 0}], r"sample 1 .*extra \['z'\]"),
    ("a key holds another kind of value", [{"x": 1.0}, {"x": "one"}],
     r"sample 1 key 'x' holds a str \(str\), sample 0's a number"),
    ("tensors of another rank", [{"x": torch.zeros(2)}, {"x": torch.zeros(2, 2)}],
     r"sample 1 key 'x' holds a 2-dim tensor \(Tensor\), sample 0's a 1-dim tensor"),
    ("a list where numbers were", [{"x": None}, {"x": 1}, {"x": [1]}],
     r"sample 2 key 'x' holds a list \(list\), sample 1's a number"),
    ("numbers, not samples", [1, 2, 3], r"dataset sample 0 is a int"),
    ("non-string keys", [{1: "a"}], r"sample 0 has non-string keys"),
    ("a dict, not a list", {"prompt": "hi"}, r"must be a list of samples"),
]  # fmt: skip


@pytest.mark.parametrize("samples, pattern", [c[1:] for c in DATASET_MISTAKES],
                         ids=[c[0] for c in DATASET_MISTAKES])  # fmt: skip
def test_dataset_mistakes_are_named_when_the_dataset_is_set(samples, pattern):
    engine = one_model_engine(ToyPolicy("policy"))
    raises(DataError, pattern, engine.set_dataset, samples)


def test_an_evaluation_set_is_checked_too():
    evaluator = Evaluator(lambda batch: ToyPolicy("policy").eval_step(batch))
    raises(DataError, r"Evaluator dataset sample 1 key 'x' holds a str", evaluator.set_dataset,
           [{"x": 1}, {"x": "a"}])  # fmt: skip


# -- model outputs -------------------------------------------------------------------------
class Returns(TorchModule):
    """``forward_step``/``eval_step`` return ``args.make(data)``; ``train_step`` its
    ``args.metrics``."""

    def __init__(self, name, make=None, metrics=None):
        super().__init__(name)
        self.make, self.metrics = make, metrics

    def forward_step(self, data):
        return self.make(data)

    def eval_step(self, data):
        return self.make(data)

    def train_step(self, micro_batches):
        return self.metrics


OUTPUT_MISTAKES = [
    ("a float value", lambda d: {"a": 1.0}, r"key 'a' holds a float \(1.0\)"),
    ("a 0-dim tensor", lambda d: {**d, "s": torch.tensor(2.0)}, r"key 's' holds a 0-dim tensor"),
    ("one row too few", lambda d: {**d, "y": d["x"][:-1]},
     r"keys with different numbers of rows \(.*y: 3"),
    ("None", lambda d: None, r"returned a NoneType; a model call in a flow must return a dict"),
    ("a tensor, not a dict", lambda d: d["x"], r"returned a Tensor"),
    ("a non-string key", lambda d: {**d, 0: d["x"]}, r"returned a dict with the key 0"),
]  # fmt: skip


@pytest.mark.parametrize("make, pattern", [c[1:] for c in OUTPUT_MISTAKES],
                         ids=[c[0] for c in OUTPUT_MISTAKES])  # fmt: skip
def test_model_output_mistakes_name_the_model_and_the_flow_line(make, pattern):
    flowgraph.init({"runtime": RUNTIME})
    bad = Returns("bad", make)

    def env_flow(batch):
        return bad.forward_step(batch)

    engine = Engine(Environment(env_flow)).set_dataset(prompts(4, seed=0))
    text = raises(DataError, "bad.forward_step", engine.learn)
    assert line_of(env_flow, "bad.forward_step") in text
    raises(DataError, pattern, Engine(Environment(env_flow)).set_dataset(prompts(4, seed=0)).learn)


def test_an_eval_step_that_returns_a_list():
    flowgraph.init({"runtime": {**RUNTIME, "eval_episode_interval": 1}})
    bad, policy = Returns("bad", lambda d: [1, 2]), ToyPolicy("policy")

    def eval_flow(batch):
        return bad.eval_step(batch)

    engine = Engine(Environment(lambda b: policy.forward_step(b)),
                    evaluator=Evaluator(eval_flow).set_dataset(prompts(4, seed=1)))  # fmt: skip
    text = raises(DataError, r"bad.eval_step .* returned a list", engine.set_dataset(
        prompts(4, seed=0)).learn)  # fmt: skip
    assert line_of(eval_flow, "bad.eval_step") in text


METRIC_MISTAKES = [
    ("a list", [1.0], r"train_step .* returned a list; return a dict of metrics"),
    ("a string metric", {"note": "ok"}, r"returned metric 'note' = 'ok' \(a str\)"),
    ("a tensor of several values", {"loss": torch.ones(3)}, r"metric 'loss' = tensor"),
    ("a None metric", {"loss": None}, r"metric 'loss' = None"),
]  # fmt: skip


@pytest.mark.parametrize("metrics, pattern", [c[1:] for c in METRIC_MISTAKES],
                         ids=[c[0] for c in METRIC_MISTAKES])  # fmt: skip
def test_train_step_metric_mistakes_are_refused_by_name(metrics, pattern):
    flowgraph.init({"runtime": RUNTIME})
    trainer = Returns("trainer", metrics=metrics)

    def trainer_flow(batch):
        trainer.train_step(batch)

    engine = Engine(trainer=Trainer(trainer_flow)).set_dataset(prompts(4, seed=0))
    text = raises(DataError, pattern, engine.learn)
    assert line_of(trainer_flow, "trainer.train_step") in text


def test_metrics_that_are_one_element_tensors_are_converted():
    flowgraph.init({"runtime": RUNTIME})
    trainer = Returns("trainer", metrics={"loss": torch.tensor([0.25]), "steps": 1})
    engine = Engine(trainer=Trainer(lambda b: trainer.train_step(b)))
    records = engine.set_dataset(prompts(4, seed=0)).learn()
    assert records[0].metrics == {"trainer/loss": 0.25, "trainer/steps": 1.0}


# -- setup, step and evaluation hooks ------------------------------------------------------
class FailingSetup(ToyPolicy):
    def setup(self):
        raise OSError("weights.pt not found")


def test_a_setup_that_raises_keeps_its_type_with_a_note_naming_the_model():
    # Sized from the config, so that setup() runs only for real (not to size the model).
    flowgraph.init({"runtime": RUNTIME, "models": {"policy": {"params": "1K"}}})
    engine = one_model_engine(FailingSetup("policy")).set_dataset(prompts(4, seed=0))
    raises(OSError, r"weights.pt not found.*failed while setting up model policy", engine.learn)


def evaluated_engine(post_process) -> Engine:
    flowgraph.init({"runtime": {**RUNTIME, "eval_episode_interval": 1}})
    policy = ToyPolicy("policy")
    evaluator = Evaluator(lambda b: policy.eval_step(b), post_process).set_dataset(prompts(4, 1))
    return Engine(Environment(lambda b: policy.forward_step(b)),
                  evaluator=evaluator).set_dataset(prompts(4, seed=0))  # fmt: skip


def test_a_post_process_that_raises_keeps_its_type_with_a_note():
    def post_process(results):
        raise KeyError("accuracy")

    raises(KeyError, r"accuracy.*post_process of the evaluation after episode 1",
           evaluated_engine(post_process).learn)  # fmt: skip


@pytest.mark.parametrize(
    "result, pattern",
    [([0.5], r"post_process returned a list; return a dict of metrics"),
     ({"name": "run-1"}, r"post_process returned metric 'name' = 'run-1' \(a str\)"),
     ({"scores": torch.ones(4)}, r"metric 'scores' = tensor")],
    ids=["a list", "a string metric", "a tensor of scores"],
)  # fmt: skip
def test_post_process_results_are_refused_by_name(result, pattern):
    raises(DataError, pattern, evaluated_engine(lambda results: result).learn)


def test_post_process_tensor_metrics_are_converted():
    records = evaluated_engine(lambda results: {"acc": torch.tensor(0.5)}).learn()
    assert records[-1].metrics["eval/acc"] == 0.5


# -- parameter syncs -----------------------------------------------------------------------
def sync_engine(**config) -> tuple:
    flowgraph.init({"runtime": RUNTIME, **config})
    policy, trainer = ToyPolicy("policy"), PolicyTrainer("ppo_policy")
    return one_model_engine(policy, trainer).set_dataset(prompts(4, seed=0)), policy, trainer


def test_swapped_sync_arguments_suggest_the_swap():
    engine, policy, trainer = sync_engine()
    engine.set_parameter_sync(policy, trainer)
    raises(EngineError, r"set_parameter_sync\(policy, ppo_policy\): the arguments are swapped"
           r".*write set_parameter_sync\(ppo_policy, policy\)", engine.learn)  # fmt: skip


def test_a_sync_from_a_model_nothing_trains():
    flowgraph.init({"runtime": RUNTIME})
    policy, reference = ToyPolicy("policy"), ToyPolicy("reference")

    def env_flow(batch):
        return reference.forward_step(policy.forward_step(batch))

    engine = Engine(Environment(env_flow)).set_parameter_sync(reference, policy)
    raises(EngineError, r"reference is not trained .*nothing to copy",
           engine.set_dataset(prompts(4, seed=0)).learn)  # fmt: skip


def test_a_sync_into_a_trained_model():
    engine, policy, trainer = sync_engine(models={"policy": {"trainable": True}})
    engine.set_parameter_sync(trainer, policy)
    raises(EngineError, r"policy is trained too, and each sync would overwrite its training",
           engine.learn)  # fmt: skip


def test_a_model_synced_from_two_sources_or_from_itself():
    engine, policy, trainer = sync_engine()
    engine.set_parameter_sync(trainer, policy)
    raises(EngineError, r"policy already receives from ppo_policy", engine.set_parameter_sync,
           trainer, policy)  # fmt: skip
    raises(EngineError, r"src and dst are one", engine.set_parameter_sync, policy, policy)


# -- the run's lifecycle -------------------------------------------------------------------
def test_learn_twice_is_refused_with_how_to_train_longer():
    engine, policy, trainer = sync_engine()
    engine.set_parameter_sync(trainer, policy).learn()
    trained = trainer.model.weight.detach().clone()
    raises(EngineError, r"learn\(\) already ran on this Engine.*raise runtime.num_episode",
           engine.learn)  # fmt: skip
    assert torch.equal(trainer.model.weight, trained)  # nothing was set up again


# -- files and directories -----------------------------------------------------------------
@pytest.mark.parametrize("key", ["checkpoint_dir", "log_dir"])
def test_a_directory_setting_that_is_a_file_is_refused_before_any_work(tmp_path, key):
    taken = tmp_path / "taken"
    taken.write_text("not a directory")
    engine, policy, trainer = sync_engine()
    flowgraph.init({"runtime": {**RUNTIME, key: str(taken)}})
    raises(ConfigError, rf"runtime.{key}: '.*taken' is a file, not a directory", engine.learn)
    assert trainer.setup_count == 0  # refused before setting anything up


def checkpointed_run(tmp_path, **runtime):
    engine, policy, trainer = sync_engine()
    flowgraph.init({"runtime": {**RUNTIME, "num_episode": 2, "save_episode_interval": 1,
                                "checkpoint_dir": str(tmp_path / "ckpt"), **runtime}})  # fmt: skip
    return engine.set_parameter_sync(trainer, policy).learn()


@pytest.mark.parametrize(
    "damage, words",
    [(lambda meta: [meta], "holds a JSON list, not flowgraph's metadata"),
     (lambda meta: {k: v for k, v in meta.items() if k != "history"}, "'history' is missing"),
     (lambda meta: {**meta, "episode": "two"}, "'episode' is a str")],
    ids=["a list", "a missing key", "a string episode"],
)  # fmt: skip
def test_foreign_checkpoint_metadata_is_skipped_with_a_warning(tmp_path, caplog, damage, words):
    checkpointed_run(tmp_path)
    meta_path = tmp_path / "ckpt" / "episode_000002" / "meta.json"
    meta_path.write_text(json.dumps(damage(json.loads(meta_path.read_text()))))
    with caplog.at_level(logging.WARNING, logger="flowgraph"):
        records = checkpointed_run(tmp_path, num_episode=3)
    assert f"skipping damaged checkpoint {meta_path.parent}" in caplog.text
    assert words in caplog.text and str(meta_path) in caplog.text
    assert [r.episode for r in records] == [1, 2, 3]  # resumed from episode 1's checkpoint


def test_resuming_after_a_model_changed_shape_names_the_model(tmp_path):
    checkpointed_run(tmp_path)

    def wider(base):
        class Wider(base):
            def setup(self):
                super().setup()
                self.model = torch.nn.Linear(4, 8)  # (4, 4) when the checkpoint was written

        return Wider

    flowgraph.init({"runtime": {**RUNTIME, "num_episode": 3, "save_episode_interval": 1,
                                "checkpoint_dir": str(tmp_path / "ckpt")}})  # fmt: skip
    policy, trainer = wider(ToyPolicy)("policy"), wider(PolicyTrainer)("ppo_policy")
    engine = one_model_engine(policy, trainer).set_dataset(prompts(4, seed=0))
    engine.set_parameter_sync(trainer, policy)
    pattern = (
        r"holds a model ppo_policy that does not fit this run's ppo_policy"
        r".*size mismatch.*Restore models.ppo_policy's settings, or start afresh"
    )
    raises(CheckpointError, pattern, engine.learn)


# -- the flowgraph.rl modules' arguments ---------------------------------------------------
TINY = {"n_layer": 1, "n_head": 2, "n_embd": 8}
ARG_MISTAKES = [
    ("a word for a number", {**TINY, "lr": "fast"}, GRPOTrainer,
     r"models.m.args.lr: expected a number \(like the default 0.001\), got 'fast'"),
    ("a typo in a key", {**TINY, "lrr": 0.1}, GRPOTrainer,
     r"models.m.args.lrr: unknown argument .*did you mean 'lr'"),
    ("width not a multiple of the heads", {**TINY, "n_embd": 10, "n_head": 4}, PolicyInference,
     r"models.m.args.n_embd \(10\) is not a multiple of n_head \(4\)"),
    ("vocabulary smaller than the tokenizer", {**TINY, "vocab_size": 4}, PolicyInference,
     r"models.m.args.vocab_size \(4\) is smaller than the tokenizer's 13 tokens"),
    ("no layers", {**TINY, "n_layer": 0}, PolicyInference,
     r"models.m.args.n_layer: must be at least 1"),
    ("a fractional layer count", {**TINY, "n_layer": 1.5}, PolicyInference,
     r"models.m.args.n_layer: expected a whole number"),
    ("a word for a temperature", {**TINY, "temperature": "hot"}, PolicyInference,
     r"models.m.args.temperature: expected a number"),
    ("a fractional top_k", {**TINY, "top_k": 2.5}, PolicyInference,
     r"models.m.args.top_k: expected a whole number"),
    ("an unknown rule reward", {"task": "count_upp"}, RewardInference,
     r"models.m.args.task: unknown rule reward 'count_upp'; did you mean 'count_up'"),
    ("an unknown Hugging Face model type", {"hf_config": {"model_type": "gtp2"}}, PolicyInference,
     r"models.m.args.hf_config.model_type: .*no model type 'gtp2'; did you mean 'gpt2'"),
    ("a Hugging Face config without a type", {"hf_config": {"n_layer": 1}}, PolicyInference,
     r"models.m.args.hf_config needs a model_type"),
    ("a Hugging Face directory without config.json", {"hf_model": "/nonexistent"},
     PolicyInference, r"models.m.args.hf_model='/nonexistent' has no config.json"),
]  # fmt: skip


@pytest.mark.parametrize("args, module, pattern", [c[1:] for c in ARG_MISTAKES],
                         ids=[c[0] for c in ARG_MISTAKES])  # fmt: skip
def test_rl_module_argument_mistakes_name_the_key(args, module, pattern):
    flowgraph.init({"runtime": {**RUNTIME, "prompt_length": 4, "response_length": 4},
                    "models": {"m": {"args": args}}})  # fmt: skip
    model = module("m")
    model.config = flowgraph.config.current_config()
    model.trainable = module is GRPOTrainer

    def use():
        model.setup()
        if module is PolicyInference:  # arguments read when answering
            model.forward_step({"prompt": ["12", "34"]})

    raises(ConfigError, pattern, use)


def test_a_subclass_lists_its_own_args_and_the_compiler_reports_bad_ones_as_config_errors():
    class Scored(RewardInference):
        extra_args = frozenset({"bonus"})

    flowgraph.init({"runtime": RUNTIME, "models": {"m": {"args": {"bonus": 1.0}}}})
    model = Scored("m")
    model.config = flowgraph.config.current_config()
    model.setup()  # its own argument is known
    policy = PolicyInference("policy")
    flowgraph.init({"runtime": RUNTIME, "models": {"policy": {"args": {**TINY, "n_head": 3}}}})
    engine = Engine(Environment(lambda b: policy.forward_step(b)))
    # Sizing runs setup() on the meta device: its ConfigError comes through as it is.
    raises(ConfigError, r"models.policy.args.n_embd \(8\) is not a multiple of n_head \(3\)",
           engine.compile, flowgraph.compiler.cluster.ClusterSpec.cpu(1))  # fmt: skip


# -- flowc -------------------------------------------------------------------------------
def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


FLOWC_SCRIPT_MISTAKES = [
    ("a syntax error", "def flow(batch)\n    return batch\n", r"train.py:1: syntax error"),
    ("an exception on import", "import json\nvalue = json.loads('{')\n",
     r"importing .*train.py raised JSONDecodeError: .* \(at .*train.py:2\)"),
    ("a missing module", "import no_such_module_here\n", r"raised ModuleNotFoundError"),
    ("sys.exit on import", "import sys\nsys.exit('bye')\n", r"raised SystemExit: bye"),
]  # fmt: skip


@pytest.mark.parametrize("body, pattern", [c[1:] for c in FLOWC_SCRIPT_MISTAKES],
                         ids=[c[0] for c in FLOWC_SCRIPT_MISTAKES])  # fmt: skip
def test_flowc_script_mistakes_are_one_line_with_exit_code_2(tmp_path, capsys, body, pattern):
    import re

    assert flowc(["trace", script(tmp_path, body)]) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_flowc_stops_a_script_that_trains_when_imported(tmp_path, capsys):
    target = script(tmp_path, """
        import flowgraph
        from flowgraph import Engine, Environment
        from seed_models import PolicyInference, prompts

        policy = PolicyInference("policy")
        engine = Engine(Environment(lambda b: policy.forward_step(b))).set_dataset(prompts(4, 0))
        flowgraph.init({"runtime": {"sample_per_episode": 4}})
        engine.learn()
    """)  # fmt: skip
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    try:
        assert flowc(["compile", target, "--world-size", "1", "--cpu"]) == 2
    finally:
        sys.path.remove(str(Path(__file__).parent))
    err = capsys.readouterr().err
    assert "train.py:9 calls learn() when the script is imported" in err
    assert 'put the call under `if __name__ == "__main__":`' in err


@pytest.mark.parametrize(
    "args, words",
    [(["--world-size", "0"], "--world-size must be at least 1, got 0"),
     (["--world-size", "-8"], "--world-size must be at least 1, got -8"),
     (["--nodes", "0", "--gpus-per-node", "8"], "--nodes and --gpus-per-node must be at least 1"),
     (["--world-size", "8", "--gpus-per-node", "0"], "--gpus-per-node must be at least 1"),
     (["--world-size", "8", "--config", "/nonexistent.yaml"], "does not exist")],
    ids=["zero devices", "negative devices", "zero nodes", "zero per node", "missing config"],
)  # fmt: skip
def test_flowc_argument_mistakes_are_one_line_with_exit_code_2(capsys, args, words):
    example = str(Path(__file__).parent.parent / "examples" / "rlhf_toy.py")
    assert flowc(["compile", example, *args]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_flowc_report_reads_complete_lines_and_names_a_foreign_file(tmp_path, capsys):
    line = {"episode": 1, "samples": 4, "seconds": 0.5, "stages": {"env": 0.5}, "metrics": {}}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(line) + "\n" + '{"episode": 2, "sam')
    assert flowc(["report", str(tmp_path), "--no-plots"]) == 0  # a run still writing line 2
    assert "1 episodes" in capsys.readouterr().out
    (tmp_path / "metrics.jsonl").write_text('["not", "ours"]\n')
    assert flowc(["report", str(tmp_path), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'metrics.jsonl'}:1 is not an episode record of flowgraph" in err


# -- non-finite losses -----------------------------------------------------------------------
class NaNAt(ValueTrainer):
    """Reports a NaN loss from episode ``args.at`` on."""

    def train_step(self, micro_batches):
        self.steps = getattr(self, "steps", 0) + 1
        metrics = super().train_step(micro_batches)
        return {**metrics, "loss": float("nan")} if self.steps >= 3 else metrics


def test_a_nan_loss_stops_the_run_naming_model_episode_and_step(tmp_path):
    flowgraph.init({"runtime": {**RUNTIME, "num_episode": 3, "save_episode_interval": 1,
                                "checkpoint_dir": str(tmp_path / "ckpt")}})  # fmt: skip
    trainer = NaNAt("value_trainer")

    def trainer_flow(batch):
        trainer.train_step(batch)

    engine = Engine(trainer=Trainer(trainer_flow)).set_dataset(prompts(4, seed=0))
    flowgraph.init({"runtime": {**RUNTIME, "num_episode": 3, "train_global_batch_size": 2,
                                "save_episode_interval": 1,
                                "checkpoint_dir": str(tmp_path / "ckpt")}})  # fmt: skip
    pattern = (
        r"value_trainer.train_step at episode 2, global step 0 "
        r"\(test_mistakes.py:\d+\) reported loss = nan.*last checkpoint is intact"
    )
    text = raises(NonFiniteError, pattern, engine.learn)
    assert line_of(trainer_flow, "trainer.train_step") in text
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "episode_000001"


def test_skip_drops_non_finite_steps_and_the_rl_trainers_skip_their_update(caplog):
    flowgraph.init({
        "runtime": {**RUNTIME, "num_episode": 1, "on_nonfinite": "skip", "prompt_length": 4,
                    "response_length": 4, "num_inference_per_prompt": 2,
                    "train_micro_batch_size": 8},
        "models": {"policy": {"args": TINY},
                   "grpo_policy": {"args": {**TINY, "beta": 0.0}}},
    })  # fmt: skip
    policy, trainer = PolicyInference("policy"), GRPOTrainer("grpo_policy")
    reward = RewardInference("reward")

    class Poisoned(GRPOTrainer):
        def train_step(self, micro_batches):
            self.before = {k: v.detach().clone() for k, v in self.model.named_parameters()}
            for mb in micro_batches:
                mb["advantages"] = torch.full_like(mb["advantages"], float("inf"))
            return super().train_step(micro_batches)

    trainer = Poisoned("grpo_policy")

    def env_flow(batch):
        return reward.forward_step(policy.forward_step(batch))

    def trainer_flow(batch):
        trainer.train_step(batch)

    engine = Engine(Environment(env_flow), Trainer(trainer_flow)).set_dataset(
        ["12", "34", "56", "78"])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="flowgraph"):
        records = engine.learn()
    assert "dropped from the metrics (runtime.on_nonfinite=skip)" in caplog.text
    assert "grpo_policy/loss" not in records[0].metrics  # the non-finite metrics are dropped
    for name, value in trainer.model.named_parameters():
        assert torch.equal(value, trainer.before[name]), f"{name} was updated"

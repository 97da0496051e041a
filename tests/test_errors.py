"""Every misuse gets a TraceError subclass (or another FlowgraphError) whose message names
the cause, the user's source line and the fix. One test per case."""

import inspect
import traceback

import pytest
import torch

import flowgraph
from flowgraph import Engine, Environment, Evaluator, TorchModule, Trainer
from flowgraph.compiler import trace_flow
from flowgraph.errors import (
    ArithmeticTraceError,
    BatchMergeError,
    ConfigError,
    ControlFlowError,
    DataError,
    EngineError,
    FlowDefinitionError,
    IndexingError,
    InspectionError,
    IterationError,
    LenError,
    ModelCallError,
    ParameterSyncError,
)
from seed_models import PolicyInference, PolicyTrainer, RewardInference, prompts

policy = PolicyInference("policy")
reward = RewardInference("reward")
ppo_policy = PolicyTrainer("ppo_policy")


def line_of(func, text):
    """'test_errors.py:N' of the line of func's source containing text."""
    lines, start = inspect.getsourcelines(func)
    offset = next(i for i, line in enumerate(lines) if text in line)
    return f"test_errors.py:{start + offset}"


def trace_error(flow, error, *fragments, at):
    """Trace flow, expect error; check message fragments and the user's line. An error
    raised while the flow runs ends its traceback in the user's code: flowgraph's frames
    inside the flow call (proxies, the call recorder) are hidden."""
    with pytest.raises(error) as info:
        trace_flow(flow)
    message = str(info.value)
    for fragment in (*fragments, line_of(flow, at)):
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    frames = traceback.extract_tb(info.tb)
    inside_flow = [i for i, f in enumerate(frames) if f.filename == __file__ and f.name == "flow"]
    if inside_flow:
        shown = frames[inside_flow[-1] :]
        assert not [f for f in shown if "/flowgraph/" in f.filename], "flowgraph frames shown"
    return message


def test_if_on_model_output():
    def flow(batch):
        out = policy.forward_step(batch)
        if out:
            return out
        return reward.forward_step(out)

    msg = trace_error(
        flow,
        ControlFlowError,
        "%out, the output of policy.forward_step",
        "used as a condition",
        "Fix: branch inside the model's forward_step",
        at="if out:",
    )
    assert "    if out:" in msg  # the offending source line is quoted


def test_not_and_while_on_flow_input():
    def flow(batch):
        while not batch:
            pass

    trace_error(flow, ControlFlowError, "the flow's argument `batch`", at="while not batch")


def test_iterating_a_batch():
    def flow(batch):
        for sample in batch:
            policy.forward_step(sample)

    trace_error(flow, IterationError, "iterated over", "generation_batch_size", at="for sample")


def test_unpacking_two_outputs_from_one_call():
    def flow(batch):
        a, b = policy.forward_step(batch)
        return a

    trace_error(flow, IterationError, "unpacked", at="a, b =")


def test_len_of_a_batch():
    def flow(batch):
        n = len(batch)
        return policy.forward_step(batch) if n else None

    trace_error(flow, LenError, "passed to len()", at="len(batch)")


def test_arithmetic_on_an_output():
    def flow(batch):
        out = policy.forward_step(batch)
        return out * 2

    trace_error(flow, ArithmeticTraceError, "arithmetic or a comparison (`*`)", at="out * 2")


def test_comparison_on_an_output():
    def flow(batch):
        out = reward.forward_step(batch)
        ok = out > 0
        return ok

    trace_error(flow, ArithmeticTraceError, "(`>`)", at="out > 0")


def test_indexing_an_output():
    def flow(batch):
        out = reward.forward_step(batch)
        return reward.forward_step(out["reward"])

    trace_error(flow, IndexingError, "indexed with ['reward']", "receives the whole dict",
                at='out["reward"]')  # fmt: skip


def test_attribute_of_an_output():
    def flow(batch):
        out = policy.forward_step(batch)
        print(out.shape)

    trace_error(flow, IndexingError, "attribute .shape", at="out.shape")


def test_model_call_with_no_inputs():
    def flow(batch):
        return policy.forward_step()

    trace_error(flow, ModelCallError, "policy.forward_step() has no inputs", at="forward_step()")


def test_model_call_with_a_constant_argument():
    def flow(batch):
        return policy.forward_step(batch, 0.7)

    trace_error(flow, ModelCallError, "argument 2 is a float", "models.<name>.args",
                at="batch, 0.7")  # fmt: skip


def test_model_call_with_keyword_arguments():
    def flow(batch):
        return policy.forward_step(batch, temperature=1.0)

    trace_error(flow, ModelCallError, "keyword arguments (temperature)", at="temperature=1.0")


def test_model_call_with_a_list_of_batches():
    def flow(batch):
        out = policy.forward_step(batch)
        return reward.forward_step([batch, out])

    trace_error(flow, ModelCallError, "pass them as separate arguments", at="[batch, out]")


def test_step_method_the_module_does_not_define():
    def flow(batch):
        policy.train_step(batch)

    trace_error(flow, ModelCallError, "PolicyInference does not define train_step",
                at="policy.train_step")  # fmt: skip


def test_returning_two_outputs():
    def flow(batch):
        a = policy.forward_step(batch)
        b = reward.forward_step(batch)
        return a, b

    trace_error(flow, FlowDefinitionError, "returns 2 values (%a, %b)", "one model output",
                at="return a, b")  # fmt: skip


def test_returning_a_dict():
    def flow(batch):
        return {"out": policy.forward_step(batch)}

    trace_error(flow, FlowDefinitionError, "returns a dict", at='return {"out"')


def test_flow_with_two_parameters():
    def flow(batch, extra):
        return policy.forward_step(batch)

    with pytest.raises(
        FlowDefinitionError, match=r"takes \(batch, extra\); a flow takes exactly one"
    ):
        trace_flow(flow)


def test_torch_function_on_a_batch():
    net = torch.nn.Linear(4, 4)

    def flow(batch):
        return net(batch)

    trace_error(flow, InspectionError, "torch function linear()",
                "wrap it in a TorchModule subclass", at="net(batch)")  # fmt: skip


def test_object_that_is_not_a_base_module():
    class Plain:
        def forward_step(self, data):
            return {"y": data["x"]}

    plain = Plain()

    def flow(batch):
        return plain.forward_step(batch)

    with pytest.raises(IndexingError) as info:
        trace_flow(flow)
    message = str(info.value)
    assert "Plain is not a BaseModule" in message and "subclass flowgraph.TorchModule" in message
    assert line_of(flow, "plain.forward_step") in message  # the flow's line is named too


def test_train_step_in_an_environment_flow():
    def flow(batch):
        ppo_policy.train_step(batch)
        return policy.forward_step(batch)

    with pytest.raises(FlowDefinitionError, match="training belongs in the Trainer flow"):
        Engine(Environment(flow))


def test_trained_and_served_in_one_flow():
    def flow(batch):
        out = ppo_policy.forward_step(batch)
        ppo_policy.train_step(out)

    with pytest.raises(FlowDefinitionError, match="is trained .* and served .* in one flow"):
        trace_flow(flow)


def test_trainer_flow_that_trains_nothing():
    def flow(batch):
        policy.forward_step(batch)

    with pytest.raises(FlowDefinitionError, match="calls no train_step"):
        Engine(trainer=Trainer(flow))


def test_environment_that_returns_nothing_with_a_trainer():
    def env_flow(batch):
        policy.forward_step(batch)

    def trainer_flow(batch):
        ppo_policy.train_step(batch)

    with pytest.raises(FlowDefinitionError, match="returns nothing, but the Trainer needs"):
        Engine(Environment(env_flow), Trainer(trainer_flow))


def test_two_modules_with_one_name():
    other = RewardInference("policy")

    def flow(batch):
        return other.forward_step(policy.forward_step(batch))

    with pytest.raises(EngineError, match="two different modules are named 'policy'"):
        trace_flow(flow)


def test_invalid_module_name():
    with pytest.raises(EngineError, match="module name must be a non-empty identifier"):
        PolicyInference("my.policy")


def test_engine_given_a_function_instead_of_an_environment():
    def env_flow(batch):
        return policy.forward_step(batch)

    with pytest.raises(EngineError, match=r"must be a Environment or None, got function"):
        Engine(env_flow)


def test_parameter_sync_with_a_plain_module():
    def env_flow(batch):
        return policy.forward_step(batch)

    with pytest.raises(EngineError, match="src is a Linear, not a BaseModule"):
        Engine(Environment(env_flow)).set_parameter_sync(torch.nn.Linear(4, 4), policy)


def test_parameter_sync_with_a_model_outside_the_engine():
    def env_flow(batch):
        return policy.forward_step(batch)

    with pytest.raises(EngineError, match="not called by any flow of this Engine"):
        Engine(Environment(env_flow)).set_parameter_sync(ppo_policy, policy)


class WiderPolicy(TorchModule):
    def setup(self):
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8))

    def forward_step(self, data):
        return data


def test_parameter_sync_between_mismatched_models():
    flowgraph.init({"runtime": {"num_episode": 1, "sample_per_episode": 4,
                                "log_episodes": False}})  # fmt: skip
    wide = WiderPolicy("policy")

    def env_flow(batch):
        return wide.forward_step(batch)

    def trainer_flow(batch):
        ppo_policy.train_step(batch)

    engine = Engine(Environment(env_flow), Trainer(trainer_flow))
    engine.set_parameter_sync(ppo_policy, wide).set_dataset(prompts(4, seed=0))
    with pytest.raises(ParameterSyncError) as info:
        engine.learn()
    message = str(info.value)
    assert "set_parameter_sync(ppo_policy, policy): parameters do not match" in message
    assert "weight: no parameter 'weight' in policy" in message
    assert "0.weight: in policy but receives nothing from ppo_policy" in message
    assert "map_sync_name" in message


def test_parameter_sync_shape_mismatch_names_both_shapes():
    class Narrow(TorchModule):
        def setup(self):
            self.model = torch.nn.Linear(4, 2)

        def forward_step(self, data):
            return data

    flowgraph.init({"runtime": {"sample_per_episode": 4, "log_episodes": False}})
    narrow = Narrow("policy")
    engine = (
        Engine(
            Environment(lambda batch: narrow.forward_step(batch)),
            Trainer(lambda batch: ppo_policy.train_step(batch)),
        )
        .set_parameter_sync(ppo_policy, narrow)
        .set_dataset(prompts(4, seed=0))
    )
    with pytest.raises(
        ParameterSyncError, match=r"weight -> weight: \(4, 4\) float32 vs \(2, 4\) float32"
    ):
        engine.learn()


@pytest.mark.parametrize(
    ("samples", "fragment"),
    [
        ([], "Engine dataset is empty"),
        ({"prompt": "hi"}, "list of samples (dicts or strings) or a dataset file's path, got dict"),
        ("hello", "Engine dataset 'hello' does not exist; to train on strings pass a list"),
        ((s for s in ["a"]), "got generator"),
        (["ok", 3], "dataset sample 1 is a int"),
    ],
)
def test_bad_datasets(samples, fragment):
    def env_flow(batch):
        return policy.forward_step(batch)

    engine = Engine(Environment(env_flow))
    with pytest.raises(DataError) as info:
        engine.set_dataset(samples)
    assert fragment in str(info.value)


def test_learn_without_a_dataset():
    engine = Engine(Environment(lambda batch: policy.forward_step(batch)))
    with pytest.raises(EngineError, match=r"call engine.set_dataset\(train_prompts\)"):
        engine.learn()


def test_evaluator_without_a_dataset():
    engine = Engine(
        Environment(lambda batch: policy.forward_step(batch)),
        evaluator=Evaluator(lambda batch: policy.eval_step(batch)),
    ).set_dataset(prompts(4, seed=0))
    with pytest.raises(EngineError, match="the Evaluator has no dataset"):
        engine.learn()


def test_config_names_a_model_the_engine_does_not_have():
    flowgraph.init({"models": {"polcy": {"num_gpu": 1}}})
    engine = Engine(Environment(lambda batch: policy.forward_step(batch)))
    with pytest.raises(
        ConfigError, match="models.polcy: no model named 'polcy'.*did you mean 'policy'"
    ):
        engine.set_dataset(prompts(4, seed=0)).learn()


def test_inputs_that_disagree_on_a_key():
    class Shifted(TorchModule):
        def forward_step(self, data):
            return {**data, "x": data["x"] + 1}

    flowgraph.init({"runtime": {"sample_per_episode": 4, "log_episodes": False,
                                "check_merges": True}})  # fmt: skip
    shifted = Shifted("shifted")
    policy_local = PolicyInference("policy")

    def env_flow(batch):
        a = policy_local.forward_step(batch)
        b = shifted.forward_step(batch)
        return reward.forward_step(a, b)

    engine = Engine(Environment(env_flow)).set_dataset(prompts(4, seed=0))
    with pytest.raises(BatchMergeError) as info:
        engine.learn()
    message = str(info.value)
    assert "key 'x' comes from both policy.forward_step" in message
    assert "and shifted.forward_step" in message
    assert line_of(env_flow, "policy_local.forward_step") in message


def test_model_returning_a_non_dict():
    class ListReturner(TorchModule):
        def forward_step(self, data):
            return [1, 2]

    flowgraph.init({"runtime": {"sample_per_episode": 4, "log_episodes": False}})
    bad = ListReturner("bad")
    engine = Engine(Environment(lambda batch: bad.forward_step(batch)))
    with pytest.raises(
        DataError,
        match=r"bad.forward_step \(test_errors.py:\d+\) returned a list; .* must return a dict",
    ):
        engine.set_dataset(prompts(4, seed=0)).learn()


def test_exception_inside_a_model_names_the_node_and_line():
    class Broken(TorchModule):
        def forward_step(self, data):
            raise RuntimeError("boom")

    flowgraph.init({"runtime": {"sample_per_episode": 4, "log_episodes": False}})
    broken = Broken("broken")

    def env_flow(batch):
        out = broken.forward_step(batch)
        return out

    engine = Engine(Environment(env_flow)).set_dataset(prompts(4, seed=0))
    with pytest.raises(RuntimeError, match="boom") as info:
        engine.learn()
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "While executing %out = call_model[broken.forward_step](%batch)" in notes
    assert line_of(env_flow, "broken.forward_step") in notes

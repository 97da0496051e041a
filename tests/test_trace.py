"""Tracing the seed's flows: golden graph text, names, source lines, lint."""

import pytest

import rlhf_flows
from flowgraph import Engine, Environment, Evaluator, Trainer
from flowgraph.compiler import Graph, Node, trace_flow
from flowgraph.errors import FlowDefinitionError


def rlhf_engine():
    return (
        Engine(
            Environment(rlhf_flows.env_flow),
            Trainer(rlhf_flows.trainer_flow),
            Evaluator(rlhf_flows.eval_flow),
        )
        .set_parameter_sync(rlhf_flows.ppo_policy, rlhf_flows.policy)
        .set_parameter_sync(rlhf_flows.ppo_value, rlhf_flows.value)
    )


def test_golden_rlhf_graphs(golden):
    golden("rlhf_graphs.txt", str(rlhf_engine()))


def test_golden_plain_python_flow(golden, capsys):
    traced = trace_flow(rlhf_flows.plain_python_flow)
    assert "tracing with 2 models, batch is Proxy(%batch)" in capsys.readouterr().out
    golden("plain_python_flow.txt", str(traced.graph))


def test_graph_structure_of_env_flow():
    graph = trace_flow(rlhf_flows.env_flow).graph
    assert [n.target for n in graph.calls()] == [
        "policy.forward_step",
        "reference.forward_step",
        "value.forward_step",
        "reward.forward_step",
    ]
    reward = graph.node("reward_out")
    assert reward.inputs == ("policy_out", "ref_out", "value_out")
    assert reward.source.line == 25 and reward.source.file.endswith("rlhf_flows.py")
    assert "reward.forward_step(policy_out, ref_out, value_out)" in reward.source.code
    assert graph.returned is reward
    assert graph.models() == ["policy", "reference", "value", "reward"]


def test_tracing_is_deterministic():
    assert str(rlhf_engine()) == str(rlhf_engine())


def test_engine_collects_every_model_once():
    assert list(rlhf_engine().modules) == [
        "policy", "reference", "value", "reward", "ppo_policy", "ppo_value"
    ]  # fmt: skip


def test_lint_rejects_use_before_definition():
    g = Graph("bad")
    g.add(Node("batch", "input", "batch"))
    g.add(Node("b", "call_model", "m.forward_step", ("a",)))
    g.add(Node("a", "call_model", "m.forward_step", ("batch",)))
    g.add(Node("output", "output", "output", ("b",)))
    with pytest.raises(FlowDefinitionError, match="%b uses %a before it is defined"):
        g.lint()


def test_lint_rejects_unknown_model_and_missing_output():
    g = Graph("bad")
    g.add(Node("batch", "input", "batch"))
    g.add(Node("a", "call_model", "ghost.forward_step", ("batch",)))
    with pytest.raises(FlowDefinitionError, match="0 output nodes, expected 1"):
        g.lint()
    g.add(Node("output", "output", "output", ("a",)))
    with pytest.raises(FlowDefinitionError, match="unknown model 'ghost'"):
        g.lint(known_models={"policy"})


def test_node_rejects_unknown_opcode():
    with pytest.raises(ValueError, match="unknown opcode"):
        Node("x", "call_function", "f")

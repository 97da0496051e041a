"""Compiler: placement, schedule, simulation, plan JSON, determinism, messages."""

import json

import pytest

from compile_helpers import (
    SIZES,
    DeepSpeedIdentity,
    Identity,
    compile_on,
    config,
    meshes,
    rlhf_engine,
)
from flowgraph import Engine, Environment, TorchModule, Trainer
from flowgraph.compiler.cluster import ClusterSpec, Mesh, format_ranks
from flowgraph.compiler.cost import parse_params
from flowgraph.compiler.plan import Instruction, Plan, RankStream, parse_ranks
from flowgraph.compiler.simulate import simulate
from flowgraph.errors import ConfigError, PlanError

EXPLICIT_8 = {
    "runtime": {"colocation": [["policy", "reference"], ["ppo_policy", "ppo_value"]]},
    "models": {"policy": {"num_gpu": 2}, "reference": {"num_gpu": 2}, "value": {"num_gpu": 1},
               "reward": {"num_gpu": 1}, "ppo_policy": {"num_gpu": 4},
               "ppo_value": {"num_gpu": 4}},
}  # fmt: skip


def explicit_8():
    return config(EXPLICIT_8["runtime"], EXPLICIT_8["models"])


# -- text forms ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "RUN %policy_out policy.forward_step[w3]",
        "RUN %x reward-model.forward_step[step2]",
        "SEND %policy_out[w3] r0-r3->r4-r7",
        "RECV %ref_out[w0] r4->r0-r3,r6",
        "GATHER %r1[w1] r4-r7->r0-r3",
        "TRAIN %ppo_policy_train_step ppo_policy[step12]",
        "SYNC ppo-policy->policy",
        "SYNC ppo_policy->policy",
        "BCAST ppo_value->value bucket2 r4-r7->r0-r3",
        "FREE policy",
        "LOAD ppo_policy",
    ],
)
def test_instruction_text_round_trips(text):
    assert str(Instruction.parse(text, phase="env")) == text


@pytest.mark.parametrize(
    "text", ["JUMP x", "RUN policy", "RUN policy.forward_step[w0]", "SEND %x[w1] r0", "FREE a b"]
)
def test_bad_instruction_text(text):
    with pytest.raises(PlanError, match="instruction"):
        Instruction.parse(text, phase="env")


def test_rank_ranges():
    assert format_ranks([0, 1, 2, 3, 6, 8, 9]) == "r0-r3,r6,r8-r9"
    assert parse_ranks("r0-r3,r6,r8-r9") == (0, 1, 2, 3, 6, 8, 9)
    assert str(Mesh(range(512, 1024))) == "r512-r1023"


def test_cluster_specs():
    assert ClusterSpec.from_world_size(64).nodes == 8
    assert ClusterSpec.from_world_size(4).devices_per_node == 4
    env = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    assert ClusterSpec.from_torchrun_env(env).nodes == 2
    assert ClusterSpec.from_torchrun_env(env).device == "cpu"
    with pytest.raises(PlanError, match="not a whole number of nodes"):
        ClusterSpec.from_world_size(12)


def test_parse_params():
    assert parse_params("7B") == 7_000_000_000 and parse_params("1.5b") == 1_500_000_000
    assert parse_params("350M") == 350_000_000 and parse_params("12K") == 12_000
    with pytest.raises(PlanError, match="models.policy.params='lots' is not a parameter count"):
        parse_params("lots", "policy")


def test_meta_device_sizing_leaves_the_module_untouched():
    import torch

    class Big(TorchModule):
        def setup(self):
            self.model = torch.nn.Linear(40_000, 40_000)

    big = Big("big")
    assert big.measure_params() == 40_000 * 40_000 + 40_000
    assert big.model is None  # nothing was really built


def test_meta_device_sizing_reads_the_config_being_compiled():
    import torch

    from flowgraph.config import Config

    class Sized(TorchModule):
        def setup(self):
            width = self.model_config.args.get("width", 1)
            self.model = torch.nn.Linear(width, width, bias=False)

    sized = Sized("sized")
    assert sized.measure_params(Config(models={"sized": {"args": {"width": 300}}})) == 90_000
    assert sized.config is None  # the config was lent for the measurement only


def test_meta_sizing_failure_asks_for_params():
    class Loader(TorchModule):
        def setup(self):
            raise FileNotFoundError("/ckpt/policy.pt")

    with pytest.raises(PlanError, match=r"could not size model 'loader'.*set models.loader.params"):
        Loader("loader").measure_params()


# -- placement -----------------------------------------------------------------------------
def test_one_device_colocates_everything():
    plan = compile_on(1)
    assert set(meshes(plan).values()) == {(0,)}
    ops = {ins.op for s in plan.streams for ins in s.instructions}
    assert "SEND" not in ops and "SYNC" in ops and "BCAST" not in ops


def test_two_devices_auto():
    plan = compile_on(2)
    assert all(set(r) <= {0, 1} for r in meshes(plan).values())
    assert any("chosen:" in note for note in plan.notes)


def test_explicit_placement_on_8():
    plan = compile_on(8, explicit_8())
    assert meshes(plan) == {
        "policy": (0, 1), "reference": (0, 1), "value": (2,), "reward": (3,),
        "ppo_policy": (4, 5, 6, 7), "ppo_value": (4, 5, 6, 7),
    }  # fmt: skip
    assert plan.notes == []  # explicit: no auto placement report
    names = [s.name for s in plan.streams]
    assert names == ["r0-r1", "r2", "r3", "r4-r7"]


@pytest.mark.parametrize("world", [8, 64, 1024])
def test_auto_placement_fits_and_divides(world):
    plan = compile_on(world)
    budget = plan.cluster.device_memory_bytes
    per_ranks = {}
    for p in plan.placement:
        per_ranks[p.ranks] = per_ranks.get(p.ranks, 0) + p.memory
        assert max(p.ranks) < world
    assert all(v <= budget for v in per_ranks.values())
    assert plan.estimates.episode_s > 0


def test_auto_placement_prefers_splitting_when_colocation_does_not_fit():
    # 20B trainers without ZeRO do not fit next to the inference models on 80 GiB devices.
    sizes = {"policy": "3B", "reference": "3B", "value": "3B", "reward": "3B",
             "ppo_policy": "3B", "ppo_value": "3B"}  # fmt: skip
    plan = compile_on(8, config(sizes=sizes))
    placed = meshes(plan)
    assert placed["policy"] != placed["ppo_policy"]
    assert any("colocate all on 8" in n and "rejected" in n for n in plan.notes)


def test_auto_placement_honours_user_groups_and_sizes():
    cfg = config({"colocation": [["ppo_policy", "policy"]]}, {"value": {"num_gpu": 2}})
    plan = compile_on(8, cfg)
    placed = meshes(plan)
    assert placed["ppo_policy"] == placed["policy"]
    assert len(placed["value"]) == 2


def test_offload_lets_colocated_models_share_memory_and_adds_free_and_load():
    sizes = {"policy": "7B", "reference": "7B", "value": "7B", "reward": "7B",
             "ppo_policy": "7B", "ppo_value": "7B"}  # fmt: skip
    zero3 = {"backend": "deepspeed", "zero_stage": 3}
    everything = {m: {"num_gpu": 8, "offload": True} for m in sizes}
    for t in ("ppo_policy", "ppo_value"):
        everything[t].update(zero3)
    cfg = config({"colocation": [list(sizes)], "sample_per_episode": 512,
                  "train_global_batch_size": 64}, everything, sizes)  # fmt: skip
    plan = compile_on(8, cfg, engine=rlhf_engine(trainer_class=DeepSpeedIdentity))
    text = "\n".join(str(i) for i in plan.streams[0].instructions)
    assert "LOAD policy" in text and "FREE policy" in text and "LOAD ppo_policy" in text


def test_compiling_reports_zero3_on_part_of_the_ranks_and_a_backend_without_its_module():
    split = {m: {"num_gpu": 4 if m.startswith("ppo_") else 1} for m in SIZES}
    split["ppo_policy"].update(zero_stage=3)
    cfg = config({"colocation": [["ppo_policy", "ppo_value"]]}, split)
    with pytest.raises(PlanError, match=r"models.ppo_policy: zero_stage 3 on ranks \[4, 5, 6, 7\] "
                       "of 8: DeepSpeed partitions ZeRO-3 models with a barrier over all ranks.*"
                       "use zero_stage 1 or 2"):  # fmt: skip
        compile_on(8, cfg, engine=rlhf_engine(trainer_class=DeepSpeedIdentity))
    with pytest.raises(ConfigError, match="models.ppo_policy.backend: deepspeed needs a "
                       "DeepSpeedModule, but Identity is a BaseModule"):  # fmt: skip
        compile_on(8, config(models={"ppo_policy": {"backend": "deepspeed"}}))


# -- infeasible requests -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("runtime", "models", "fragment"),
    [
        ({}, {m: {"num_gpu": 4} for m in
              ["policy", "reference", "value", "reward", "ppo_policy", "ppo_value"]},
         "the models need 24 devices (policy 4, reference 4, value 4, reward 4, ppo_policy 4, "
         "ppo_value 4) but the cluster has 8: lower num_gpu, or share devices"),
        ({"colocation": [["policy", "reference"], ["reference", "value"]]}, {},
         "runtime.colocation puts 'reference' in two groups"),
        ({"colocation": [["polcy", "reference"]]}, {},
         "runtime.colocation names 'polcy', which no flow calls; did you mean 'policy'? "
         "models: policy"),
        ({"colocation": [["policy", "reference"]]},
         {m: {"num_gpu": n} for m, n in [("policy", 2), ("reference", 4), ("value", 1),
                                          ("reward", 1), ("ppo_policy", 1), ("ppo_value", 1)]},
         "colocated models share one mesh, but num_gpu differs (policy: 2, reference: 4)"),
        ({"train_global_batch_size": 6, "train_micro_batch_size": 2, "sample_per_episode": 16},
         {m: {"num_gpu": n} for m, n in [("policy", 1), ("reference", 1), ("value", 1),
                                          ("reward", 1), ("ppo_policy", 2), ("ppo_value", 2)]},
         "train_global_batch_size (6) must be a multiple of train_micro_batch_size x 2 = 4"),
    ],
)  # fmt: skip
def test_infeasible_explicit_requests(runtime, models, fragment):
    with pytest.raises(PlanError) as info:
        compile_on(8, config(runtime, models))
    assert fragment in str(info.value)
    assert str(info.value).startswith("[place_models]")  # the failing pass is named


def test_memory_over_budget_says_what_to_change():
    """At most three lines: the model that does not fit anywhere and the change that fixes
    it (tests/test_placement.py has the other infeasible cases)."""
    sizes = {"policy": "30B", "reference": "30B", "value": "30B", "reward": "30B",
             "ppo_policy": "30B", "ppo_value": "30B"}  # fmt: skip
    with pytest.raises(PlanError) as info:
        compile_on(8, config(sizes=sizes))
    message = str(info.value)
    assert len(message.splitlines()) <= 3
    assert message.startswith("[place_models] no placement fits the cluster: policy needs ")
    assert (
        "per device on any mesh (inference models are not sharded) but devices have "
        "80.0 GiB (so do reference, value, reward, ppo_policy, ppo_value)" in message
    )
    assert (
        "\nTo fix: set models.<name>.precision: bf16 for policy, reference, value, reward "
        "(then " in message
    )
    assert (
        "set models.<name>.backend: deepspeed and zero_stage: 3 for ppo_policy, "
        "ppo_value" in message
    )


# -- schedule and simulation ---------------------------------------------------------------
def test_disjoint_meshes_pipeline_across_waves():
    plan = compile_on(8, explicit_8())
    by_name = {s.name: (s, t) for s, t in zip(plan.streams, plan.times, strict=True)}
    policy_stream, policy_times = by_name["r0-r1"]
    reward_stream, reward_times = by_name["r3"]
    second_policy_run = [t for i, t in zip(policy_stream.instructions, policy_times, strict=True)
                         if str(i) == "RUN %policy_out policy.forward_step[w1]"][0]  # fmt: skip
    last_reward_run = [t for i, t in zip(reward_stream.instructions, reward_times, strict=True)
                       if i.op == "RUN"][-1]  # fmt: skip
    # policy is still generating wave 1 ... while reward works on earlier waves: overlap.
    first_reward_run = [t for i, t in zip(reward_stream.instructions, reward_times, strict=True)
                        if i.op == "RUN"][0]  # fmt: skip
    assert first_reward_run[0] < last_reward_run[0]
    assert policy_times[-1][1] > first_reward_run[0]
    assert second_policy_run[0] < last_reward_run[0]


def test_colocated_models_run_stage_by_stage():
    plan = compile_on(8, explicit_8())
    stream = plan.streams[0]  # policy + reference on r0-r1
    runs = [str(i) for i in stream.instructions if i.op == "RUN" and i.phase == "env"]
    policy = [i for i, r in enumerate(runs) if r.startswith("RUN %policy_out")]
    reference = [i for i, r in enumerate(runs) if r.startswith("RUN %ref_out")]
    assert max(policy) < min(reference)


def test_every_send_has_its_receive_in_compiled_plans():
    for world in (1, 2, 8):
        plan = compile_on(world)
        sends = sorted(str(i).replace("SEND", "X") for s in plan.streams for i in s.instructions
                       if i.op == "SEND")  # fmt: skip
        recvs = sorted(str(i).replace("RECV", "X") for s in plan.streams for i in s.instructions
                       if i.op == "RECV")  # fmt: skip
        assert sends == recvs


def stream(ranks, *texts, phase="env"):
    return RankStream(tuple(ranks), ["m"], [Instruction.parse(t, phase) for t in texts])


def test_hand_made_deadlock_is_caught_with_both_instructions_named():
    a = stream([0], "RECV %b[w0] r1->r0", "SEND %a[w0] r0->r1")
    b = stream([1], "RECV %a[w0] r0->r1", "SEND %b[w0] r1->r0")
    with pytest.raises(PlanError) as info:
        simulate([a, b], lambda i, ins: 1.0, world=2)
    message = str(info.value)
    assert "deadlock: r0 waits at `RECV %b[w0] r1->r0`" in message
    assert "whose sender r1 waits at `RECV %a[w0] r0->r1`" in message


def test_collectives_in_different_orders_deadlock():
    a = stream([0], "BCAST p->q bucket0 r0->r1", "BCAST p->q bucket1 r0->r1", phase="sync")
    b = stream([1], "BCAST p->q bucket1 r0->r1", "BCAST p->q bucket0 r0->r1", phase="sync")
    with pytest.raises(PlanError, match="deadlock: r0 waits at `BCAST p->q bucket0 r0->r1`"):
        simulate([a, b], lambda i, ins: 1.0, world=2)


def test_unmatched_send_and_missing_collective_member():
    a = stream([0], "SEND %a[w0] r0->r1")
    b = stream([1], "RUN %b m.forward_step[w0]")
    with pytest.raises(PlanError, match="has 1 SEND and 0 RECV"):
        simulate([a, b], lambda i, ins: 1.0, world=2)
    a = stream([0], "BCAST p->q bucket0 r0->r1", phase="sync")
    with pytest.raises(PlanError, match="never entered by r1"):
        simulate([a, b], lambda i, ins: 1.0, world=2)


def test_simulated_time_and_steps():
    a = stream([0], "RUN %a m.forward_step[w0]", "SEND %a[w0] r0->r1")
    b = stream([1], "RECV %a[w0] r0->r1", "RUN %b m.forward_step[w0]")
    sim = simulate([a, b], lambda i, ins: 2.0, world=2)
    assert sim.end == [[2.0, 2.0], [4.0, 6.0]]
    assert sim.steps == [[1, 2], [2, 3]]
    assert sim.estimates.episode_s == 6.0
    assert sim.estimates.bubble == pytest.approx(1 - (2 + 4) / 12)


# -- the plan as data ----------------------------------------------------------------------
def test_plan_json_round_trips_exactly():
    plan = compile_on(8, explicit_8(), engine=rlhf_engine(with_eval=True))
    text = plan.to_json()
    again = Plan.from_json(text)
    assert again == plan
    assert again.to_json() == text
    assert json.loads(text)["streams"][0]["ranks"] == "r0-r1"


def test_compiling_twice_gives_identical_json():
    first = compile_on(64, engine=rlhf_engine(with_eval=True)).to_json()
    second = compile_on(64, engine=rlhf_engine(with_eval=True)).to_json()
    assert first == second
    assert Plan.from_json(first).hash() == Plan.from_json(second).hash()


def test_large_plans_collapse_ranks_into_groups():
    plan = compile_on(1024)
    assert len(plan.streams) <= 6
    assert all(name.startswith("r") for name in (s.name for s in plan.streams))
    assert plan.stream_of(1023) in plan.streams


def test_eval_outputs_are_gathered_on_rank_zero():
    plan = compile_on(8, explicit_8(), engine=rlhf_engine(with_eval=True))
    gathers = [i for s in plan.streams for i in s.instructions
               if i.op == "GATHER" and i.phase == "eval"]  # fmt: skip
    assert gathers and all(0 in g.dst_ranks for g in gathers)


def test_env_output_is_gathered_on_every_trainer_rank_before_training():
    plan = compile_on(8, explicit_8())
    trainer_stream = plan.streams[-1]  # r4-r7
    ops = [str(i) for i in trainer_stream.instructions]
    gathers = [i for i, text in enumerate(ops) if text.startswith("GATHER")]
    first_train = next(i for i, text in enumerate(ops) if text.startswith("TRAIN"))
    assert len(gathers) == plan.waves["env"] and max(gathers) < first_train
    assert ops[gathers[0]] == "GATHER %reward_forward_step[w0] r3->r4-r7"


def test_trainer_only_and_env_only_programs_compile():
    t = Identity("t")
    engine = Engine(trainer=Trainer(lambda b: t.train_step(b)))
    plan = engine.compile(ClusterSpec.from_world_size(2), config(sizes={"t": "1B"}))
    assert [str(i) for i in plan.streams[0].instructions][:1] == ["TRAIN %t_train_step t[step0]"]
    p = Identity("p")
    engine = Engine(Environment(lambda b: p.forward_step(b)))
    plan = engine.compile(ClusterSpec.from_world_size(4), config(sizes={"p": "1B"}))
    assert {i.op for s in plan.streams for i in s.instructions} == {"RUN"}


def test_receives_out_of_the_senders_order_are_refused_naming_the_pair():
    a = stream([0], "SEND %a[w0] r0->r1", "SEND %b[w0] r0->r1")
    b = stream([1], "RECV %b[w0] r0->r1", "RECV %a[w0] r0->r1")
    with pytest.raises(PlanError, match=r"r0 sends to r1 in another order than r1 receives: "
                       r"message 0 is `SEND %a\[w0\] r0->r1` but r1 expects `RECV %b\[w0\] "
                       r"r0->r1` there"):  # fmt: skip
        simulate([a, b], lambda i, ins: 1.0, world=2)


def test_split_layouts_receive_in_the_senders_order():
    """The README's 8-GPU split layout once sent all %policy_out waves, then all %ref_out,
    to r3, which interleaved them: with NCCL's in-order matching, a wrong batch."""
    plan = compile_on(8, explicit_8())
    reward = next(s for s in plan.streams if s.name == "r3")
    from_policy_group = [str(i) for i in reward.instructions
                         if i.op == "RECV" and i.src_ranks == (0, 1)]  # fmt: skip
    sent = [str(i).replace("SEND", "RECV") for s in plan.streams for i in s.instructions
            if i.op == "SEND" and i.dst_ranks == (3,) and i.src_ranks == (0, 1)]  # fmt: skip
    assert from_policy_group == sent
    assert from_policy_group[:2] == ["RECV %policy_out[w0] r0-r1->r3",
                                     "RECV %policy_out[w1] r0-r1->r3"]  # fmt: skip


def test_a_method_called_twice_gives_two_distinguishable_run_lines():
    policy = Identity("policy")

    def env_flow(batch):
        a = policy.forward_step(batch)
        return policy.forward_step(a)

    engine = Engine(Environment(env_flow)).set_dataset(["x"] * 8)
    cfg = config({"sample_per_episode": 8, "generation_batch_size": 4,
                  "train_global_batch_size": 8}, sizes={"policy": "1M"})  # fmt: skip
    plan = engine.compile(ClusterSpec.cpu(1), cfg)
    runs = [str(i) for i in plan.streams[0].instructions if i.op == "RUN"]
    assert runs == ["RUN %a policy.forward_step[w0]",
                    "RUN %policy_forward_step policy.forward_step[w0]",
                    "RUN %a policy.forward_step[w1]",
                    "RUN %policy_forward_step policy.forward_step[w1]"]  # fmt: skip
    assert "RUN %a policy.forward_step[w0]" in plan.grid()
    table = plan.phases["env"]
    assert [n.name for n in table.nodes] == ["a", "policy_forward_step"]
    assert table.node("policy_forward_step").inputs == ("a",)
    assert table.node("a").source.startswith("test_compiler.py:")
    assert table.returned == "policy_forward_step"

"""Placement that finds a plan when one exists (issue 18): layouts sized by what the models
can use (idle devices reported), uneven inference shares, parameterless models colocated
with their inputs, infeasible requests answered in at most three lines."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from compile_helpers import SIZES, DeepSpeedIdentity, compile_on, config, meshes, rlhf_engine
from flowgraph.cli import main
from flowgraph.compiler.cluster import ClusterSpec
from flowgraph.compiler.cost import ModelSpec, Workload
from flowgraph.compiler.placement import (
    Layout,
    PlacementRequest,
    candidate_layouts,
    fold_parameterless,
    place,
    units,
)
from flowgraph.errors import PlanError

EXAMPLE = Path(__file__).parent.parent / "examples" / "rlhf_toy.py"
SMALL = {"sample_per_episode": 16, "generation_batch_size": 8, "train_micro_batch_size": 1,
         "train_global_batch_size": 16}  # fmt: skip
TRAINERS = ("ppo_policy", "ppo_value")


def used(plan):
    return {r for p in plan.placement for r in p.ranks}


def trainer_sizes(plan):
    return {p.model: len(p.ranks) for p in plan.placement if p.role == "trainer"}


# -- fewer devices than the cluster -------------------------------------------------------
@pytest.mark.parametrize("world", [1024, 16384])
def test_small_batches_on_many_devices_plan_with_idle_devices(world):
    plan = compile_on(world, config(SMALL))
    ranks = used(plan)
    assert max(ranks) < 64 and len(ranks) < world  # sized by the batches, not the cluster
    for n in trainer_sizes(plan).values():  # trainers keep even shares of a global step
        assert 16 % n == 0
    idle = world - len(ranks)
    note = next(n for n in plan.notes if "devices idle" in n)
    assert note.startswith(f"16 samples per episode keep {idle:,} of {world:,} devices idle "
                           "(the env has 2 micro-batches: sample_per_episode 16 / "
                           "generation_batch_size 8; a trainer's mesh must divide the 16 "
                           "micro-batches of a global step: train_global_batch_size 16 / "
                           "train_micro_batch_size 1)")  # fmt: skip
    assert any(n.startswith("  to use more devices: raise sample_per_episode") for n in plan.notes)
    assert sum("(rejected)" in n for n in plan.notes) <= 2
    compared = "\n".join(plan.notes)  # no candidate gives inference more than 2 devices
    assert all(int(n) <= 2 for n in re.findall(r"inference (\d+) \+", compared)), compared


def test_idle_devices_cost_nothing_to_schedule():
    """Idle devices run no stream: the plan on 16,384 devices is the plan on 1,024."""
    small, large = compile_on(1024, config(SMALL)), compile_on(16384, config(SMALL))
    assert [s.ranks for s in small.streams] == [s.ranks for s in large.streams]
    assert [len(s.instructions) for s in small.streams] == [
        len(s.instructions) for s in large.streams
    ]


def test_flowc_compiles_the_seed_flow_with_16_samples_on_1024_devices(capsys):
    code = main(["compile", str(EXAMPLE), "--world-size", "1024", "runtime.sample_per_episode=16"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert re.search(r"16 samples per episode keep [\d,]+ of 1,024 devices idle \(the env has "
                     r"\d+ micro-batch(es)?: sample_per_episode 16 / generation_batch_size \d+",
                     out)  # fmt: skip
    assert "to use more devices: raise sample_per_episode" in out


def test_trainer_meshes_divide_the_global_step():
    # 12 rows a step in micro-batches of 1: trainers on 8 devices would not divide it.
    cfg = config({"sample_per_episode": 12, "generation_batch_size": 4,
                  "train_global_batch_size": 12})  # fmt: skip
    plan = compile_on(8, cfg)
    assert all(12 % n == 0 for n in trainer_sizes(plan).values())
    assert max(used(plan)) < 8


def request_for(sizes, num_gpu=None, world=8, colocation="auto", producers=None, syncs=(),
                **work):  # fmt: skip
    names = tuple(sizes)
    specs = {m: ModelSpec(m, p, trainable=m.startswith("ppo_")) for m, p in sizes.items()}
    values = {"sample_per_episode": 64, "generation_batch_size": 8, "train_micro_batch_size": 1,
              "train_global_batch_size": 64, "num_training_epoch": 1, "prompt_length": 16,
              "response_length": 16, **work}  # fmt: skip
    return PlacementRequest(
        models=names,
        specs=specs,
        num_gpu={m: (num_gpu or {}).get(m, "auto") for m in names},
        colocation=colocation,
        inference_models=frozenset(m for m in names if not m.startswith("ppo_")),
        work=Workload(**values),
        cluster=ClusterSpec(nodes=max(1, world // 8), devices_per_node=min(world, 8)),
        producers=producers or {},
        syncs=syncs,
    )


def test_equal_estimates_go_to_the_layout_with_fewer_devices():
    request = request_for({"policy": 1000, "ppo_policy": 1000}, world=64)
    fewest = min(c.devices for c in candidate_layouts(request, units(request)))
    for estimate in (lambda c: 1.0, lambda c: 1.0 - 1e-4 * c.devices):  # within 1 %: a tie
        layout, notes = place(request, estimate)
        assert layout.devices == fewest
        assert f"  chosen: {layout.name}" in notes
    layout, _ = place(request, lambda c: 1.0 / c.devices)  # more devices, clearly faster
    assert layout.devices > fewest


def test_split_layouts_give_every_device_to_inference_or_trainers():
    request = request_for({"policy": 1000, "reference": 1000, "ppo_policy": 1000}, world=8,
                          sample_per_episode=128, train_global_batch_size=64)  # fmt: skip
    names = [c.name for c in candidate_layouts(request, units(request))]
    assert names == ["colocate all on 8", "inference 4 + trainers 4", "inference 6 + trainers 2",
                     "inference 7 + trainers 1", "each group apart, by compute"]  # fmt: skip


# -- uneven inference shares --------------------------------------------------------------
def test_an_inference_mesh_need_not_divide_the_micro_batches():
    cfg = config({"sample_per_episode": 12, "generation_batch_size": 4,
                  "train_global_batch_size": 12},
                 {m: {"num_gpu": n} for m, n in [("policy", 2), ("reference", 1), ("value", 1),
                                                  ("reward", 1), ("ppo_policy", 1),
                                                  ("ppo_value", 1)]})  # fmt: skip
    plan = compile_on(8, cfg)
    assert plan.waves["env"] == 2  # waves of 2: the last one holds micro-batch 2 only
    runs = [str(i) for s in plan.streams if s.ranks == (0, 1) for i in s.instructions]
    assert "RUN %policy_out policy.forward_step[w1]" in runs
    assert plan.notes == ["1 of 8 devices idle (r7): the num_gpu settings use 7"]


# -- models without parameters ------------------------------------------------------------
PARAMETERLESS = {**SIZES, "reward": 0}


@pytest.mark.parametrize("world", [8, 64])
def test_a_model_without_parameters_runs_with_its_inputs(world):
    plan = compile_on(world, config(sizes=PARAMETERLESS))
    placed = meshes(plan)
    assert placed["reward"] == placed["policy"]  # it reads policy's output first


def test_no_candidate_gives_a_parameterless_model_devices_of_its_own():
    sizes = {"policy": 1000, "reference": 1000, "reward": 0, "ppo_policy": 1000}
    producers = {"policy": None, "reference": "policy", "reward": "reference",
                 "ppo_policy": None}  # fmt: skip
    request = request_for(sizes, producers=producers)
    folded = fold_parameterless(request, units(request))
    assert folded == [("policy",), ("reference", "reward"), ("ppo_policy",)]
    for layout in candidate_layouts(request, folded):
        assert all(g.models != ("reward",) for g in layout.groups)
    # even where the most groups win, reward shares the devices of the model it reads
    layout, _ = place(request, lambda candidate: 1.0 / len(candidate.groups))
    assert layout.name == "each group apart, by compute"
    assert layout.mesh_of("reward") == layout.mesh_of("reference")
    # reading only the flow's input: it joins the first group
    alone = request_for(sizes, producers={**producers, "reward": None})
    assert fold_parameterless(alone, units(alone))[0] == ("policy", "reward")


def test_an_explicit_num_gpu_for_a_parameterless_model_is_respected():
    plan = compile_on(8, config(models={"reward": {"num_gpu": 1}}, sizes=PARAMETERLESS))
    placed = meshes(plan)
    assert len(placed["reward"]) == 1
    assert not set(placed["reward"]) & {r for m, rs in placed.items() if m != "reward" for r in rs}


# -- infeasible requests: at most three lines ---------------------------------------------
def lines_of(world, cfg, engine=None):
    with pytest.raises(PlanError) as info:
        compile_on(world, cfg, engine=engine)
    message = str(info.value)
    assert len(message.splitlines()) <= 3, message
    return message


def test_a_trainer_that_does_not_fit_on_its_largest_mesh():
    # 16 micro-batches a step: ppo_policy trains on at most 16 devices, too few for 12B
    # without ZeRO (or with ZeRO-1); ZeRO-2 over those 16 devices fits.
    sizes = {**SIZES, "ppo_policy": "12B"}
    message = lines_of(1024, config(SMALL, sizes=sizes))
    assert message.startswith("[place_models] no placement fits the cluster: ppo_policy needs ")
    assert "per device on its largest possible mesh (16 devices) but devices have 80.0 GiB" \
        in message  # fmt: skip
    assert "\nTo fix: set models.ppo_policy.backend: deepspeed and zero_stage: 2 (then " in message
    assert "on 16 devices)" in message
    # 40B does not fit with ZeRO-2 either: ZeRO-3 would, on every rank, with a larger step
    message = lines_of(1024, config(SMALL, sizes={**SIZES, "ppo_policy": "40B"}))
    assert "To fix: set models.ppo_policy.backend: deepspeed and zero_stage: 3 (then " in message
    assert "make train_global_batch_size a multiple of train_micro_batch_size x 1,024 = 1,024" \
        in message  # fmt: skip


def test_zero3_trainers_with_a_global_step_smaller_than_the_cluster():
    zero3 = {t: {"backend": "deepspeed", "zero_stage": 3} for t in TRAINERS}
    message = lines_of(1024, config(SMALL, zero3), rlhf_engine(trainer_class=DeepSpeedIdentity))
    assert message == (
        "[place_models] no placement fits the cluster: ppo_policy trains with zero_stage 3, so "
        "on all 1,024 devices, but a global step has 16 micro-batches (train_global_batch_size "
        "16 / train_micro_batch_size 1), which do not split evenly over 1,024\n"
        "To fix: use zero_stage 1 or 2 (placement may then leave devices idle), or make "
        "train_global_batch_size a multiple of train_micro_batch_size x 1,024 = 1,024"
    )


def test_a_fixed_trainer_mesh_that_does_not_divide_the_global_step():
    message = lines_of(8, config(models={"ppo_policy": {"num_gpu": 3}}))
    assert message == (
        "[place_models] no placement fits the cluster: ppo_policy trains on 3 devices, so "
        "train_global_batch_size (1024) must be a multiple of train_micro_batch_size x 3 = 3\n"
        "To fix: change the batch sizes or models.ppo_policy.num_gpu"
    )


def test_colocated_models_that_fit_only_with_offload():
    # Every model fits alone, but 8 devices cannot hold them apart or together.
    sizes = {m: "3B" for m in SIZES}
    cfg = config({"colocation": [list(SIZES)]}, sizes=sizes)
    message = lines_of(8, cfg)
    assert "needs" in message and "\nTo fix: set offload: true on policy, reference" in message


# -- explicit placement -------------------------------------------------------------------
EXPLICIT = {"policy": 2, "reference": 2, "value": 1, "reward": 1, "ppo_policy": 4,
            "ppo_value": 4}  # fmt: skip


def explicit(groups=(("policy", "reference"), ("ppo_policy", "ppo_value"))):
    return config({"colocation": [list(g) for g in groups]},
                  {m: {"num_gpu": n} for m, n in EXPLICIT.items()})  # fmt: skip


def test_explicit_placement_is_unchanged_and_reports_idle_devices():
    on_8, on_16 = compile_on(8, explicit()), compile_on(16, explicit())
    assert meshes(on_8) == meshes(on_16)
    assert on_8.notes == []
    assert on_16.notes == ["8 of 16 devices idle (r8-r15): the num_gpu settings use 8"]
    assert [str(i) for s in on_8.streams for i in s.instructions] == [
        str(i) for s in on_16.streams for i in s.instructions
    ]


def test_layout_devices():
    request = request_for({"policy": 1, "ppo_policy": 1})
    assert all(isinstance(c, Layout) and c.devices <= 8
               for c in candidate_layouts(request, units(request)))  # fmt: skip


# -- the actor/critic split (HybridFlow's "split" placement) ------------------------------
PPO_SIZES = {"policy": 1000, "reference": 1000, "value": 1000, "reward": 1000,
             "ppo_policy": 1000, "ppo_value": 1000}  # fmt: skip
PPO_PRODUCERS = {"policy": None, "reference": "policy", "value": "policy", "reward": "policy",
                 "ppo_policy": None, "ppo_value": None}  # fmt: skip
PPO_SYNCS = (("ppo_policy", "policy"), ("ppo_value", "value"))


def ppo_request(**kwargs):
    return request_for(PPO_SIZES, producers=PPO_PRODUCERS, syncs=PPO_SYNCS, **kwargs)


def splits(request):
    return [c for c in candidate_layouts(request, fold_parameterless(request, units(request)))
            if c.name.startswith("actor/critic split")]  # fmt: skip


def test_the_split_puts_each_trainer_with_its_copies_and_their_readers():
    (split,) = splits(ppo_request())  # halves; the load shares round to the same meshes
    assert split.name == "actor/critic split 4 + 4"
    # reference and reward are synced from no trainer: they read policy's output first
    assert [(g.models, g.mesh.size) for g in split.groups] == [
        (("policy", "reference", "reward", "ppo_policy"), 4),
        (("value", "ppo_value"), 4),
    ]


def test_the_split_keeps_colocation_groups_and_num_gpu():
    request = ppo_request(colocation=[["value", "reward"]], num_gpu={"value": 2})
    (split,) = splits(request)
    assert [(g.models, g.mesh.size) for g in split.groups] == [
        (("policy", "reference", "ppo_policy"), 4),
        (("value", "reward", "ppo_value"), 2),
    ]
    layout, _ = place(request, lambda c: 1.0 if c.name == split.name else 2.0)
    assert layout.name == "actor/critic split 4 + 2"
    assert layout.mesh_of("reward") == layout.mesh_of("value") and layout.mesh_of("value").size == 2
    # a model with the user's num_gpu but no trainer keeps ranks of its own
    (apart,) = splits(ppo_request(num_gpu={"reference": 1}))
    assert [(g.models, g.mesh.size) for g in apart.groups] == [
        (("policy", "reward", "ppo_policy"), 4),
        (("reference",), 1),
        (("value", "ppo_value"), 2),
    ]


def test_no_split_with_one_trainer_or_with_the_trainers_colocated():
    one = request_for({"policy": 1000, "reference": 1000, "ppo_policy": 1000},
                      producers={"policy": None, "reference": "policy", "ppo_policy": None},
                      syncs=(("ppo_policy", "policy"),))  # fmt: skip
    assert splits(one) == []
    assert splits(ppo_request(colocation=[["ppo_policy", "ppo_value"]])) == []
    assert splits(ppo_request(colocation=[["policy", "value"]])) == []  # both trainers' copies


def test_the_apart_family_weighs_generation_by_the_cost_model():
    """Sized by 2 P / 6 P FLOPs the generating policy got 1 device of 16; by the cost
    model's time (decoding 1,024 tokens) it is the heaviest group."""
    sizes = {m: 7 * 10**9 for m in PPO_SIZES}
    request = request_for(sizes, world=16, producers=PPO_PRODUCERS, syncs=PPO_SYNCS,
                          sample_per_episode=1024, generation_batch_size=16,
                          train_global_batch_size=128, prompt_length=1024,
                          response_length=1024)  # fmt: skip
    apart = next(c for c in candidate_layouts(request, units(request))
                 if c.name == "each group apart, by compute")  # fmt: skip
    shares = {g.models[0]: g.mesh.size for g in apart.groups}
    assert shares["policy"] == max(shares.values()) >= 8
    assert shares["policy"] > shares["reference"]  # same FLOPs a token, but it decodes


def bench_placement():
    """benchmarks/bench_placement.py as a module (its engine and configs)."""
    path = Path(__file__).parent.parent / "benchmarks" / "bench_placement.py"
    spec = importlib.util.spec_from_file_location("bench_placement", path)
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def test_7b_ppo_at_hybridflow_scale_splits_on_128_gpus_and_colocates_on_16():
    bench = bench_placement()
    engine = bench.ppo_engine()

    def compile_7b(world, zero, generation_batch):
        cluster = ClusterSpec.gpu("a100", nodes=world // 8, devices_per_node=8)
        return engine.compile(cluster, bench.ppo_config("7B", zero, True, generation_batch))

    split = compile_7b(128, 2, 16)  # the bench's fastest settings for this layout
    assert "  chosen: actor/critic split 64 + 64" in split.notes
    placed = meshes(split)
    assert placed["policy"] == placed["reference"] == placed["ppo_policy"] == tuple(range(64))
    assert placed["value"] == placed["ppo_value"] == tuple(range(64, 128))
    colocated = compile_7b(128, 3, 8)  # colocating at its best (a ZeRO-3 trainer: no split)
    assert split.estimates.episode_s < 0.95 * colocated.estimates.episode_s
    small = compile_7b(16, 2, 32)
    assert "  chosen: colocate all on 16" in small.notes
    assert any(n.startswith("  actor/critic split 8 + 8: ") for n in small.notes)

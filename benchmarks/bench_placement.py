"""What automatic placement picks for PPO at HybridFlow's scale, from the cost model alone.

PPO's six models (policy, reference, value and reward inference; ppo_policy and ppo_value
trainers) traced over identity modules whose sizes come from ``models.<name>.params`` (no
model is built), planned for 7B, 13B, 34B and 70B models (all four of the same size, as in
HybridFlow's experiments) on 16, 32, 64 and 128 GPUs of HybridFlow's testbed: A100 80 GB,
8 per node, 200 Gb/s between nodes. The workload is HybridFlow's (arXiv 2409.19256, section
8.1): prompts and responses of 1,024 tokens, 1,024 prompts per iteration, one PPO epoch of 8
updates (a global batch of 128), everything in bf16, the trainers on DeepSpeed ZeRO.

    python benchmarks/bench_placement.py          # the table (docs/compiler.md compares it)

For each setting it tries what the placer does not choose (ZeRO stage 2 or 3, offloading
colocated models between stages, 1 to 32 sequences generated at once per device) and prints
the layout auto placement picks with the fastest of them, its estimated seconds per
iteration, the other layouts it compared, and the estimates of HybridFlow's three
hand-made placements (colocate, split, standalone) planned as explicit layouts; or why no
plan fits.
"""

from __future__ import annotations

import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flowgraph import BaseModule, DeepSpeedModule, Engine, Environment, Trainer  # noqa: E402
from flowgraph.compiler.cluster import ClusterSpec, format_ranks  # noqa: E402
from flowgraph.compiler.plan import format_seconds  # noqa: E402
from flowgraph.config import load_config  # noqa: E402
from flowgraph.errors import PlanError  # noqa: E402

SIZES = ("7B", "13B", "34B", "70B")
WORLDS = (16, 32, 64, 128)
INFERENCE = ("policy", "reference", "value", "reward")
TRAINERS = ("ppo_policy", "ppo_value")
WORKLOAD = {  # HybridFlow, section 8.1
    "sample_per_episode": 1024,  # prompts per iteration
    "prompt_length": 1024,
    "response_length": 1024,
    "num_training_epoch": 1,
    "train_global_batch_size": 128,  # 8 PPO updates per epoch
    "train_micro_batch_size": 1,
}
# Settings the placer does not choose, tried for every layout (the fastest that fits wins):
# the trainers' ZeRO stage, offloading colocated models between stages, and the sequences a
# device generates at once (HybridFlow gives vLLM's KV cache whatever memory is left).
ZERO_STAGES = (2, 3)
OFFLOAD = (False, True)
GENERATION_BATCHES = (32, 16, 8, 4, 2, 1)


def hybridflow_layouts(world: int) -> dict[str, tuple[list[list[str]], dict[str, int]]]:
    """HybridFlow's three hand-made placements (section 8.3) as explicit colocation groups
    and mesh sizes; its actor is our policy + ppo_policy, its critic value + ppo_value."""
    actor, critic = ["policy", "ppo_policy"], ["value", "ppo_value"]
    every = [*INFERENCE, *TRAINERS]
    split = [["policy", "reference", "ppo_policy"], ["value", "reward", "ppo_value"]]
    # standalone as HybridFlow sized it for 13B on 128 GPUs: actor 1/2, critic 1/4,
    # reference and reward 1/8 each
    shares = {"policy": 2, "ppo_policy": 2, "value": 4, "ppo_value": 4, "reference": 8,
              "reward": 8}  # fmt: skip
    return {
        "colocate": ([every], {m: world for m in every}),
        "split": (split, {m: world // 2 for m in every}),
        "standalone": ([actor, critic], {m: world // shares[m] for m in every}),
    }


class Inference(BaseModule):
    def forward_step(self, data):
        return data


class Learner(DeepSpeedModule):
    def train_step(self, micro_batches):
        return None


def ppo_engine() -> Engine:
    """The seed's PPO flow (as examples/ppo.py and benchmarks/seed_rlhf.py wire it)."""
    m = {name: Inference(name) for name in INFERENCE}
    m.update({name: Learner(name) for name in TRAINERS})

    def env_flow(batch):
        policy_out = m["policy"].forward_step(batch)
        ref_out = m["reference"].forward_step(policy_out)
        value_out = m["value"].forward_step(policy_out)
        return m["reward"].forward_step(policy_out, ref_out, value_out)

    def trainer_flow(batch):
        m["ppo_policy"].train_step(batch)
        m["ppo_value"].train_step(batch)

    engine = Engine(Environment(env_flow), Trainer(trainer_flow))
    engine.set_parameter_sync(m["ppo_policy"], m["policy"])
    engine.set_parameter_sync(m["ppo_value"], m["value"])
    return engine


def ppo_config(size: str, zero: int, offload: bool, generation_batch: int,
               colocation="auto", num_gpu=None):  # fmt: skip
    models = {}
    for name in (*INFERENCE, *TRAINERS):
        models[name] = {"params": size, "precision": "bf16", "offload": offload}
        if name in TRAINERS:
            models[name].update(backend="deepspeed", zero_stage=zero)
        if num_gpu:
            models[name]["num_gpu"] = num_gpu[name]
    runtime = {**WORKLOAD, "generation_batch_size": generation_batch, "colocation": colocation}
    return load_config({"runtime": runtime, "models": models})


def candidates(notes: list[str]) -> tuple[str, dict[str, float]]:
    """(chosen layout, {layout: seconds}) from a plan's auto-placement notes."""
    chosen, times = "", {}
    for line in notes:
        text = line.strip()
        if text.startswith("chosen:"):
            chosen = text.removeprefix("chosen:").strip()
        elif match := re.fullmatch(r"(.+?): ([0-9.e+]+) (us|ms|s|min|h)", text):
            scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}[match[3]]
            times[match[1]] = float(match[2]) * scale
    return chosen, times


def fastest(engine: Engine, cluster: ClusterSpec, size: str, **layout) -> dict:
    """The fastest plan over the settings the placer does not choose (and the fastest for
    each ZeRO stage), or the reason none fits (the last error met)."""
    best, by_stage, errors = None, {}, {}
    for zero in ZERO_STAGES:
        for offload in OFFLOAD:
            for batch in GENERATION_BATCHES:
                try:
                    plan = engine.compile(cluster, ppo_config(size, zero, offload, batch, **layout))
                except PlanError as err:
                    errors[zero] = short(str(err).splitlines()[0].split("] ", 1)[-1])
                    continue
                knobs = f"ZeRO-{zero}{', offload' if offload else ''}, {batch} seq"
                found = {"plan": plan, "seconds": plan.estimates.episode_s, "knobs": knobs}
                if zero not in by_stage or found["seconds"] < by_stage[zero]["seconds"]:
                    by_stage[zero] = found
                if best is None or found["seconds"] < best["seconds"]:
                    best = found
    if best:
        return {**best, "by_stage": by_stage}
    return {"error": "; ".join(f"ZeRO-{zero}: {why}" for zero, why in errors.items())}


def plan_one(engine: Engine, size: str, world: int) -> dict:
    cluster = ClusterSpec.gpu("a100", nodes=world // 8, devices_per_node=8)
    row = {"size": size, "world": world, "auto": fastest(engine, cluster, size)}
    for name, (groups, num_gpu) in hybridflow_layouts(world).items():
        row[name] = fastest(engine, cluster, size, colocation=groups, num_gpu=num_gpu)
    auto = row["auto"]
    for found in [auto, *auto["by_stage"].values()] if "plan" in auto else []:
        found["chosen"], found["others"] = candidates(found["plan"].notes)
    return row


def describe(plan) -> str:
    """Which models share which ranks, e.g. 'policy+reference r0-r7 | ...'."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for entry in plan.placement:
        groups.setdefault(tuple(entry.ranks), []).append(entry.model)
    return " | ".join(f"{'+'.join(models)} {format_ranks(ranks)}"
                      for ranks, models in sorted(groups.items()))  # fmt: skip


def short(error: str) -> str:
    """The first sentence of a layout error, without its list of fixes."""
    return re.split(r": (?=place|colocate it|give|set |shard)", error)[0]


def secs(seconds: float) -> str:
    return f"{seconds:,.0f} s" if seconds >= 100 else format_seconds(seconds)


def cell(result: dict) -> str:
    return secs(result["seconds"]) if "seconds" in result else "no fit"


def main() -> list[dict]:
    engine = ppo_engine()
    rows, start = [], time.perf_counter()
    for size in SIZES:
        for world in WORLDS:
            rows.append(plan_one(engine, size, world))
    elapsed = time.perf_counter() - start
    print(f"PPO on A100 80 GB nodes (8 GPUs each, 200 Gb/s between), {WORKLOAD['prompt_length']} "
          f"+ {WORKLOAD['response_length']} tokens, {WORKLOAD['sample_per_episode']} prompts per "
          "iteration, four models of one size, bf16; seconds per iteration")  # fmt: skip
    print(f"{'size':<5} {'GPUs':>4}  {'auto picks':<22} {'estimate':>9}  {'with':<24} "
          f"{'colocate':>9} {'split':>9} {'standalone':>10}")  # fmt: skip
    for row in rows:
        auto = row["auto"]
        picked = auto.get("chosen", "no plan")
        print(f"{row['size']:<5} {row['world']:>4}  {picked:<22} {cell(auto):>9}  "
              f"{auto.get('knobs', ''):<24} {cell(row['colocate']):>9} {cell(row['split']):>9} "
              f"{cell(row['standalone']):>10}")  # fmt: skip
    print("\nauto placement's picks, and what it compared with the same settings:")
    for row in rows:
        auto = row["auto"]
        if "plan" not in auto:
            print(f"  {row['size']} on {row['world']}: no plan: {auto['error']}")
            continue
        phases = ", ".join(f"{k} {secs(v)}"
                           for k, v in auto["plan"].estimates.phase_s.items() if v)  # fmt: skip
        print(f"  {row['size']} on {row['world']}: {describe(auto['plan'])} ({phases})")
        for zero, found in sorted(auto["by_stage"].items()):
            others = ", ".join(f"{name} {secs(s)}" for name, s in found["others"].items()
                               if name != found["chosen"])  # fmt: skip
            print(
                f"      ZeRO-{zero} at best ({found['knobs']}): {found['chosen']} "
                f"{secs(found['seconds'])}; also {others or 'nothing else fits'}"
            )
    print("\nwhy HybridFlow's placements do not fit where the table says 'no fit':")
    reasons: dict[tuple[str, str], str] = {}
    for row in rows:
        for name in ("colocate", "split", "standalone"):
            if "error" in row[name]:
                reasons.setdefault((name, row["size"]), row[name]["error"])
    for (name, size), reason in reasons.items():
        print(f"  {name} {size}: {reason}")
    combinations = len(ZERO_STAGES) * len(OFFLOAD) * len(GENERATION_BATCHES)
    print(f"\n{len(rows)} settings x 4 layouts x {combinations} ZeRO/offload/batch combinations "
          f"planned in {elapsed:.1f} s")  # fmt: skip
    return [{"name": f"bench_placement {r['size']} on {r['world']} GPUs",
             "value": r["auto"].get("seconds", 0.0), "unit": "s",
             "target": r["auto"].get("chosen", "no plan")} for r in rows]  # fmt: skip


if __name__ == "__main__":
    main()

"""Compile time of the seed's RLHF flow on 8, 1,024 and 16,384 devices, of the same flow
with 16 samples per episode on 1,024 and 16,384 devices (most devices idle: placement
sizes layouts by the batches, issue 18), and of a synthetic 200-model flow on 1,024
devices (targets: 50 ms, 200 ms, 1 s; 1 s, 1 s; 1 s).

    python benchmarks/bench_compile.py            # the six targets
    python benchmarks/bench_compile.py --growth   # plus growth with devices and models
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import median_seconds, report  # noqa: E402
from seed_rlhf import Identity, build_engine  # noqa: E402

from flowgraph import DeepSpeedModule, Engine, Environment, Trainer  # noqa: E402
from flowgraph.compiler.cluster import ClusterSpec  # noqa: E402
from flowgraph.config import load_config  # noqa: E402

SIZES = {"policy": "7B", "reference": "7B", "value": "1B", "reward": "1B",
         "ppo_policy": "7B", "ppo_value": "1B"}  # fmt: skip


class DeepSpeedIdentity(DeepSpeedModule):
    """The trainers: ``backend: deepspeed`` needs a DeepSpeedModule (compiling builds none)."""

    def forward_step(self, data):
        return data

    def train_step(self, micro_batches):
        return None


def seed_engine() -> Engine:
    names = ["policy", "value", "reference", "reward", "ppo_policy", "ppo_value"]
    modules = {n: (DeepSpeedIdentity if n.startswith("ppo_") else Identity)(n) for n in names}
    engine = build_engine(modules)
    engine.evaluator = None
    return engine


def small_config():
    """16 samples per episode (2 micro-batches of 8; global steps of 16): a few dozen
    devices are all the models can use, however large the cluster. ZeRO-2 trainers (ZeRO-3
    would have to span every rank)."""
    models = {name: {"params": p, "precision": "bf16"} for name, p in SIZES.items()}
    for trainer in ("ppo_policy", "ppo_value"):
        models[trainer].update(backend="deepspeed", zero_stage=2)
    return load_config({
        "runtime": {"sample_per_episode": 16, "generation_batch_size": 8,
                    "train_micro_batch_size": 1, "train_global_batch_size": 16},
        "models": models,
    })  # fmt: skip


def seed_config(world: int):
    """Six models with realistic sizes in bf16; batch sizes that divide any power-of-two
    split."""
    models = {name: {"params": p, "precision": "bf16"} for name, p in SIZES.items()}
    for trainer in ("ppo_policy", "ppo_value"):
        models[trainer].update(backend="deepspeed", zero_stage=3)
    return load_config({
        "runtime": {"sample_per_episode": 8 * world, "generation_batch_size": 8,
                    "train_micro_batch_size": 1, "train_global_batch_size": 2 * world},
        "models": models,
    })  # fmt: skip


def synthetic_engine(num_models: int) -> tuple[Engine, object]:
    """A chain of num_models - 2 inference models and 2 trainers."""
    chain = [Identity(f"m{i}") for i in range(num_models - 2)]
    trainers = [Identity("t0"), Identity("t1")]

    def env_flow(batch):
        out = batch
        for model in chain:
            out = model.forward_step(out)
        return out

    def trainer_flow(batch):
        for trainer in trainers:
            trainer.train_step(batch)

    models = {m.name: {"params": "100M"} for m in chain + trainers}
    config = load_config({
        "runtime": {"sample_per_episode": 4096, "generation_batch_size": 4,
                    "train_micro_batch_size": 1, "train_global_batch_size": 2048},
        "models": models,
    })  # fmt: skip
    return Engine(Environment(env_flow), Trainer(trainer_flow)), config


def main() -> list[dict]:
    results = []
    engine = seed_engine()
    for world, target in ((8, "< 50 ms"), (1024, "< 200 ms"), (16384, "< 1 s")):
        config = seed_config(world)
        cluster = ClusterSpec.from_world_size(world)
        seconds = median_seconds(lambda c=cluster, g=config: engine.compile(c, g), repeats=5)
        results.append(report(f"compile seed RLHF on {world} devices", seconds * 1e3, "ms", target))
    for world in (1024, 16384):
        config, cluster = small_config(), ClusterSpec.from_world_size(world)
        plan = engine.compile(cluster, config)
        idle = world - len({r for p in plan.placement for r in p.ranks})
        seconds = median_seconds(lambda c=cluster, g=config: engine.compile(c, g), repeats=5)
        name = f"compile seed RLHF, 16 samples, on {world} ({idle} idle)"
        results.append(report(name, seconds * 1e3, "ms", "< 1 s"))
    engine, config = synthetic_engine(200)
    cluster = ClusterSpec.from_world_size(1024)
    seconds = median_seconds(lambda: engine.compile(cluster, config), repeats=3)
    results.append(report("compile 200-model chain on 1024 devices", seconds * 1e3, "ms", "< 1 s"))
    return results


def growth() -> None:
    """How compile time grows with devices (seed RLHF) and with models (chain, 1024 devices)."""
    engine = seed_engine()
    for world in (8, 64, 512, 1024, 4096, 16384):
        config, cluster = seed_config(world), ClusterSpec.from_world_size(world)
        seconds = median_seconds(lambda c=cluster, g=config: engine.compile(c, g), repeats=3)
        report(f"  growth: seed RLHF on {world} devices", seconds * 1e3, "ms")
    for models in (10, 50, 100, 200):
        chain, config = synthetic_engine(models)
        cluster = ClusterSpec.from_world_size(1024)
        seconds = median_seconds(lambda e=chain, g=config, c=cluster: e.compile(c, g), repeats=3)
        report(f"  growth: {models}-model chain on 1024 devices", seconds * 1e3, "ms")


if __name__ == "__main__":
    main()
    if "--growth" in sys.argv:
        growth()

"""Hand-built programs for compiler tests: the seed's RLHF flow over identity modules."""

from flowgraph import BaseModule, DeepSpeedModule, Evaluator
from flowgraph.compiler.cluster import ClusterSpec
from flowgraph.config import load_config
from rlhf_flows import wire

SIZES = {"policy": "1.5B", "reference": "1.5B", "value": "350M", "reward": "350M",
         "ppo_policy": "1.5B", "ppo_value": "350M"}  # fmt: skip


class Identity(BaseModule):
    def forward_step(self, data):
        return data

    def train_step(self, micro_batches):
        return None


class DeepSpeedIdentity(DeepSpeedModule):
    def forward_step(self, data):
        return data

    def train_step(self, micro_batches):
        return None


def rlhf_engine(with_eval=False, trainer_class=Identity):
    m = {name: (trainer_class if name.startswith("ppo_") else Identity)(name) for name in SIZES}

    def eval_flow(batch):
        return m["reward"].eval_step(m["policy"].eval_step(batch))

    evaluator = Evaluator(eval_flow).set_dataset(["x"] * 32) if with_eval else None
    return wire(m, evaluator)


def config(runtime=None, models=None, sizes=SIZES):
    """Sizes for every model, batch sizes that divide power-of-two meshes up to 1024."""
    runtime = {"sample_per_episode": 4096, "generation_batch_size": 4, "train_micro_batch_size": 1,
               "train_global_batch_size": 1024, **(runtime or {})}  # fmt: skip
    merged = {name: {"params": p} for name, p in sizes.items()}
    for name, extra in (models or {}).items():
        merged.setdefault(name, {}).update(extra)
    return load_config({"runtime": runtime, "models": merged})


def compile_on(world, cfg=None, engine=None, **cluster):
    engine = engine or rlhf_engine()
    spec = ClusterSpec(nodes=max(1, world // 8), devices_per_node=min(world, 8), **cluster)
    return engine.compile(spec, cfg or config())


def meshes(plan):
    return {p.model: p.ranks for p in plan.placement}

"""The workload of the runtime-overhead benchmark: the seed's RLHF wiring over MLPs big
enough that an episode does real work (about 0.2 s per rank on one CPU core).

    torchrun --nproc-per-node 2 benchmarks/spmd_workload.py flowgraph EPISODES OUT.json
    torchrun --nproc-per-node 2 benchmarks/spmd_workload.py baseline EPISODES OUT.json

``flowgraph`` runs ``engine.learn()``; ``baseline`` does the same work written by hand
with torch.distributed on the same placement (every model data-parallel on both ranks):
each rank runs the four inference models on its micro-batches, the outputs are
all-gathered, every rank cuts the same shuffled global steps and trains its share with
DDP, then the trainers' weights are copied into the inference models. Rank 0 writes the
wall time of ``EPISODES`` episodes (set-up excluded) to OUT.json.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from seed_rlhf import build_engine

import flowgraph
from flowgraph import TorchModule
from flowgraph.config import load_config
from flowgraph.data import Dataset
from flowgraph.runtime.episode import env_micro_batches, training_steps

WIDTH = 512
MODELS = ["policy", "reference", "value", "reward", "ppo_policy", "ppo_value"]
RUNTIME = {
    "sample_per_episode": 256,
    "generation_batch_size": 32,
    "train_micro_batch_size": 16,
    "train_global_batch_size": 64,
    "log_episodes": False,
}


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(WIDTH, WIDTH),
        torch.nn.ReLU(),
        torch.nn.Linear(WIDTH, WIDTH),
        torch.nn.ReLU(),
        torch.nn.Linear(WIDTH, WIDTH),
    )


class Inference(TorchModule):
    def setup(self):
        self.model = mlp()

    @torch.no_grad()
    def forward_step(self, data):
        return {**data, self.name: self.model(data["x"]).mean(-1)}


class Learner(TorchModule):
    def setup(self):
        self.model = mlp()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3)

    def train_step(self, micro_batches):
        self.optimizer.zero_grad()
        for mb in micro_batches:
            loss = ((self.model(mb["x"]).mean(-1) - mb["reward"]) ** 2).mean() / len(micro_batches)
            loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}


def prompts() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(WIDTH, generator=g)} for _ in range(1024)]


def config(episodes: int):
    colocated = {m: {"num_gpu": 2} for m in MODELS}
    return load_config(
        {
            "runtime": {**RUNTIME, "num_episode": episodes, "colocation": [MODELS]},
            "models": colocated,
        }
    )


def run_flowgraph(episodes: int) -> float:
    m = {name: (Learner if name.startswith("ppo") else Inference)(name) for name in MODELS}
    engine = build_engine(m)
    engine.evaluator = None  # the seed's eval flow is not part of this measurement
    engine.set_parameter_sync(m["ppo_policy"], m["policy"])
    engine.set_parameter_sync(m["ppo_value"], m["value"])
    engine.set_dataset(prompts())
    flowgraph.init(config(episodes))
    start = time.perf_counter()
    engine.learn()
    return time.perf_counter() - start


def run_baseline(episodes: int) -> float:
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    runtime = config(episodes).runtime
    nets = {name: mlp() for name in MODELS}
    ddp = {name: DDP(nets[name]) for name in ("ppo_policy", "ppo_value")}
    optims = {n: torch.optim.SGD(nets[n].parameters(), lr=1e-3) for n in ddp}
    dataset = Dataset(prompts(), seed=runtime.seed)
    start = time.perf_counter()
    for episode in range(1, episodes + 1):
        inputs = env_micro_batches(dataset, runtime, episode)
        share = len(inputs) // world
        mine = {}
        with torch.no_grad():
            for k in range(rank * share, (rank + 1) * share):
                x = inputs[k]["x"]
                out = {"x": x}
                for name in ("policy", "reference", "value"):
                    out[name] = nets[name](x).mean(-1)
                out["reward"] = nets["reward"](x).mean(-1)
                mine[k] = out
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        outputs = [
            merged[k]
            for merged in [dict(kv for p in parts for kv in p.items())]
            for k in range(len(inputs))
        ]
        for micro in training_steps(outputs, runtime, episode):
            per = len(micro) // world
            shard = micro[rank * per : (rank + 1) * per]
            for name, model in ddp.items():
                optims[name].zero_grad()
                for mb in shard:
                    loss = ((model(mb["x"]).mean(-1) - mb["reward"]) ** 2).mean() / len(shard)
                    loss.backward()
                optims[name].step()
        with torch.no_grad():
            for src, dst in (("ppo_policy", "policy"), ("ppo_value", "value")):
                for p_dst, p_src in zip(
                    nets[dst].parameters(), nets[src].parameters(), strict=True
                ):
                    p_dst.copy_(p_src)
    dist.barrier()
    return time.perf_counter() - start


def main(kind: str, episodes: int, out: str) -> None:
    seconds = run_flowgraph(episodes) if kind == "flowgraph" else run_baseline(episodes)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump({"seconds": seconds}, f)
    sys.stdout.flush()
    if dist.is_initialized():
        dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])

"""Framework overhead per model call: one episode of the seed's RLHF flow over identity
models, learn() against the same work written as a plain Python loop (target: under
0.5 ms per model call).

    python benchmarks/bench_overhead.py

Both sides draw the same samples, collate micro-batches of 8, call the four env models
per micro-batch (the reward model on the union of its three inputs), concatenate the
outputs, shuffle them into global batches of 64 split into micro-batches of 8, and call
the two trainers once per global step.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import median_seconds, report  # noqa: E402
from seed_rlhf import build_engine, make_modules, prompts  # noqa: E402

import flowgraph  # noqa: E402
from flowgraph.data import collate, concat, select, split  # noqa: E402

EPISODES = 10
SAMPLES = 256
GEN_BATCH = 8
GLOBAL_BATCH = 64
MICRO_BATCH = 8


def plain_loop(m, samples) -> None:
    for episode in range(EPISODES):
        drawn = samples  # the framework draws a shuffled pass; same count, same cost order
        outputs = []
        for i in range(0, SAMPLES, GEN_BATCH):
            batch = collate(drawn[i : i + GEN_BATCH])
            policy_out = m["policy"].forward_step(batch)
            ref_out = m["reference"].forward_step(policy_out)
            value_out = m["value"].forward_step(policy_out)
            outputs.append(m["reward"].forward_step({**policy_out, **ref_out, **value_out}))
        stream = concat(outputs)
        order = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(episode))
        for start in range(0, SAMPLES, GLOBAL_BATCH):
            micro = split(select(stream, order[start : start + GLOBAL_BATCH].tolist()), MICRO_BATCH)
            m["ppo_policy"].train_step(micro)
            m["ppo_value"].train_step(micro)


def main() -> list[dict]:
    samples = prompts(SAMPLES)
    flowgraph.init(
        {
            "runtime": {
                "num_episode": EPISODES,
                "sample_per_episode": SAMPLES,
                "generation_batch_size": GEN_BATCH,
                "train_global_batch_size": GLOBAL_BATCH,
                "train_micro_batch_size": MICRO_BATCH,
                "log_episodes": False,
            }
        }
    )

    def fresh_engine():
        engine = build_engine(make_modules()).set_dataset(samples)
        engine.evaluator = None  # the seed's eval flow is not part of this measurement
        return engine

    repeats = 7
    engines = [fresh_engine() for _ in range(repeats + 1)]  # an Engine learns once; built untimed
    framework = median_seconds(lambda: engines.pop().learn(), repeats=repeats)
    modules = make_modules()
    plain = median_seconds(lambda: plain_loop(modules, samples), repeats=7)
    calls = EPISODES * (SAMPLES // GEN_BATCH * 4 + SAMPLES // GLOBAL_BATCH * 2)
    per_call_ms = (framework - plain) / calls * 1e3
    return [
        report(
            "episode of seed RLHF, identity models: flowgraph", framework / EPISODES * 1e3, "ms"
        ),
        report("episode of seed RLHF, identity models: plain loop", plain / EPISODES * 1e3, "ms"),
        report("ratio flowgraph / plain loop", framework / plain, "x"),
        report("framework overhead per model call", per_call_ms, "ms", "< 0.5 ms"),
    ]


if __name__ == "__main__":
    main()

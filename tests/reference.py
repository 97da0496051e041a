"""An eager reference of the seed's RLHF run: a plain loop over the models, written apart
from the runtime, for the differential tests (tests/test_reference.py).

It follows the documented semantics directly (design.md §3): per episode, draw the
samples, run every micro-batch depth-first through policy, reference, value and reward
(merging inputs by dict union), shuffle the outputs into global steps, call both
trainers per step, copy trained weights into the inference copies, evaluate when due.
With ``runtime.max_staleness`` k, episode e + k is generated right after episode e
trained, before its weights are copied (design: docs/async.md).
The random generators are reseeded before every model call from what runs (the run's seed,
the phase, the node's name, the episode and the micro-batch or step), as the runtime
promises (``flowgraph.runtime.rng.reseed``), so its numbers must equal ``learn()``'s on
any placement. Node names are those of ``rlhf_flows.wire``'s flows (an unassigned call is
named ``<model>_<method>``).
"""

import torch

from flowgraph.data import Dataset, batch_size, concat
from flowgraph.runtime.episode import env_micro_batches, eval_micro_batches, training_steps
from flowgraph.runtime.rng import reseed
from flowgraph.runtime.telemetry import MetricAverager


def run(m, config, samples, eval_samples, post_process):
    """The episode metrics (as ``EpisodeRecord.metrics``) of the seed's RLHF flows over
    the modules ``m`` (fresh, keyed by the seed's names); ``m`` ends trained."""
    rt = config.runtime
    for name, module in m.items():
        module.config = config
        module.trainable = name.startswith("ppo_")
        reseed(rt.seed, "setup", name)
        module.setup()
    syncs = [("ppo_policy", "policy"), ("ppo_value", "value")]
    _sync(m, syncs)
    dataset, eval_set = Dataset(samples, rt.seed), Dataset(eval_samples, rt.seed)
    history = []
    if rt.enable_eval_before_training:
        history.append(_evaluate(m, rt, eval_set, 0, post_process))
    held = {dst: 0 for _, dst in syncs}  # the trained episode each inference copy holds
    generated = {}  # episode -> (outputs, version): generated ahead by max_staleness
    k_ahead = rt.max_staleness
    for episode in range(1, rt.num_episode + 1):
        # Generate every episode up to episode + k that is not generated yet, with the
        # weights the copies hold now (so episode e sees the sync after e - 1 - k).
        for ahead in range(episode, min(episode + k_ahead, rt.num_episode) + 1):
            if ahead not in generated:
                generated[ahead] = (_generate(m, rt, dataset, ahead), min(held.values()))
        outputs, version = generated.pop(episode)
        columns = {"weight_version": version, "staleness": episode - 1 - version}
        rows = [{**mb, **{key: torch.full((batch_size(mb),), n) for key, n in columns.items()}}
                for mb in outputs]  # fmt: skip
        metrics = MetricAverager()
        for step, micro in enumerate(training_steps(rows, rt, episode)):
            for trainer in ("ppo_policy", "ppo_value"):
                reseed(rt.seed, "train", f"{trainer}_train_step", episode, step)
                metrics.add(trainer, m[trainer].train_step(micro))
        if k_ahead and episode + k_ahead <= rt.num_episode:  # before this episode's sync
            generated[episode + k_ahead] = (_generate(m, rt, dataset, episode + k_ahead),
                                            min(held.values()))  # fmt: skip
        due = [(s, d) for s, d in syncs if episode % config.model(d).sync_frequency == 0]
        _sync(m, due)
        held.update({d: episode for _, d in due})
        record = {**metrics.means(), **{f"rollout/{key}": n for key, n in columns.items()}}
        interval = rt.eval_episode_interval
        if interval and episode % interval == 0:
            record.update(_evaluate(m, rt, eval_set, episode, post_process))
        history.append(record)
    return history


def _generate(m, rt, dataset, episode):
    outputs = []
    for k, batch in enumerate(env_micro_batches(dataset, rt, episode)):
        where = (episode, k)
        policy_out = _call(m, "policy", "forward_step", batch, rt, "env", "policy_out", where)
        ref_out = _call(m, "reference", "forward_step", policy_out, rt, "env", "ref_out", where)
        value_out = _call(m, "value", "forward_step", policy_out, rt, "env", "value_out", where)
        merged = {**policy_out, **ref_out, **value_out}
        outputs.append(_call(m, "reward", "forward_step", merged, rt, "env",
                             "reward_forward_step", where))  # fmt: skip
    return outputs


def _call(m, model, method, data, rt, phase, node, where):
    reseed(rt.seed, phase, node, *where)
    return getattr(m[model], method)(data)


def _sync(m, pairs):
    with torch.no_grad():
        for src, dst in pairs:
            for (_, s), (_, d) in zip(m[src].sync_parameters(), m[dst].sync_parameters(),
                                      strict=True):  # fmt: skip
                d.copy_(s)


def _evaluate(m, rt, eval_set, episode, post_process):
    results = []
    for k, batch in enumerate(eval_micro_batches(eval_set, rt)):
        r0 = _call(m, "policy", "eval_step", batch, rt, "eval", "r0", (episode, k))
        results.append(_call(m, "reward", "eval_step", r0, rt, "eval", "r1", (episode, k)))
    assert sum(batch_size(r) for r in results) == batch_size(concat(results))
    return {f"eval/{k}": v for k, v in post_process(results).items()}

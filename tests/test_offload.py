"""Offload between stages (``models.<name>.offload: true``)."""

import torch

import flowgraph
from flowgraph import TorchModule
from flowgraph.runtime.offload import Offload
from test_learn import RUNTIME, rlhf_engine, same, weights


class Trained(TorchModule):
    def setup(self):
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        self.optimizer = torch.optim.Adam(self.model.parameters())


def trained_once():
    module = Trained("trained")
    torch.manual_seed(0)
    module.setup()
    module.model(torch.randn(5, 4)).sum().backward()
    module.optimizer.step()
    return module


def test_free_moves_weights_gradients_buffers_and_optimizer_states_keeping_identity():
    module = trained_once()
    params = list(module.model.parameters())
    before = {id(p): p.detach().clone() for p in params}
    grads = [p.grad for p in params]
    # 15 weights + 3 + 3 BatchNorm parameters, their gradients, the two Adam moments:
    # 4 x 21 floats; BatchNorm's running mean and variance: 6 floats (its int64 counter too).
    expected = 4 * 21 * 4 + 6 * 4 + 8
    offload = Offload(module)
    offload.free()
    assert offload.bytes_moved == expected
    assert not offload.resident
    offload.free()  # already on the host: nothing happens
    assert offload.frees == 1
    offload.load()
    assert list(module.model.parameters()) == params  # the same Parameter objects
    assert [p.grad for p in params] == grads
    for p in params:
        assert torch.equal(p, before[id(p)])
    assert str(offload) == f"Offload(trained: {expected} B per move, 1 free, 1 load)"


def test_a_module_without_a_network_offloads_nothing():
    class Rule(TorchModule):
        def setup(self):
            pass

    offload = Offload(Rule("rule"))
    offload.free()
    offload.load()
    assert offload.bytes_moved == 0 and offload.loads == 1


def test_one_process_frees_models_outside_their_phases_and_learns_the_same(monkeypatch):
    events = []
    for action in ("free", "load"):
        original = getattr(Offload, action)

        def record(self, original=original, action=action):
            was = self.resident
            original(self)
            if was != self.resident:
                events.append(f"{action} {self.module.name}")

        monkeypatch.setattr(Offload, action, record)
    flowgraph.init({"runtime": {**RUNTIME, "num_episode": 2}})
    plain_engine, plain = rlhf_engine()
    plain_engine.learn()
    offloaded = {"policy": {"offload": True}, "ppo_policy": {"offload": True}}
    flowgraph.init({"runtime": {**RUNTIME, "num_episode": 2}, "models": offloaded})
    engine, m = rlhf_engine()
    records = engine.learn()
    # The plan's LOAD/FREE, one model resident at a time outside the sync phase.
    sync = ["load policy", "load ppo_policy", "free policy", "free ppo_policy"]
    first = ["free policy", "free ppo_policy"]  # after the initial sync: both start resident
    episode = ["load policy", "free policy", "load ppo_policy", "free ppo_policy", *sync]
    whole = ["load policy", "load ppo_policy"]  # after learn()
    assert events == first + episode + episode + whole
    assert all({"env/offload", "train/offload", "sync/offload"} <= set(r.stages) for r in records)
    for name in plain:
        assert same(weights(plain[name]), weights(m[name])), name

"""An env flow may drop rows (a filter such as DAPO's dynamic sampling): training takes the
full global batches that are left, and skips the episode's training with a warning when
none is left."""

import pytest
import torch

import flowgraph
from flowgraph import Engine, Environment, TorchModule, Trainer

KEEP = {1: 12, 2: 5, 3: 0}  # rows the filter keeps per episode (of 16; steps of 4 rows)


class Source(TorchModule):
    def setup(self):
        pass

    def forward_step(self, data):
        return {"x": torch.as_tensor(data["x"], dtype=torch.float32)}


class Filter(TorchModule):
    """Keeps the first ``KEEP[episode]`` rows of the episode's one micro-batch."""

    def setup(self):
        self.episode = 0

    def forward_step(self, data):
        self.episode += 1
        return {"x": data["x"][: KEEP[self.episode]]}


class Counter(TorchModule):
    def setup(self):
        self.model = torch.nn.Linear(1, 1)
        self.steps = []

    def train_step(self, micro_batches):
        self.steps.append(sum(len(mb["x"]) for mb in micro_batches))
        return {"rows": float(self.steps[-1])}


def test_training_takes_the_full_batches_a_filter_leaves():
    source, keep, trainer = Source("source"), Filter("filter"), Counter("trainer")
    flowgraph.init({"runtime": {"num_episode": 3, "sample_per_episode": 16,
                                "generation_batch_size": 16, "train_micro_batch_size": 2,
                                "train_global_batch_size": 4, "log_episodes": False,
                                "progress": False}})  # fmt: skip
    engine = Engine(
        Environment(lambda batch: keep.forward_step(source.forward_step(batch))),
        Trainer(lambda batch: trainer.train_step(batch)),
    ).set_dataset([{"x": float(i)} for i in range(16)])
    with pytest.warns(UserWarning) as caught:
        records = engine.learn()
    # 12 rows: 3 steps of 4; 5 rows: 1 step (the incomplete rest dropped); 0 rows: none.
    assert trainer.steps == [4, 4, 4, 4]
    assert [r.metrics.get("trainer/rows") for r in records] == [4.0, 4.0, None]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and messages[0].startswith(
        "episode 3: the env flow returned 0 rows, fewer than one global batch "
        "(train_global_batch_size=4): no optimizer step"
    )


def test_a_filter_that_could_never_fill_a_step_is_refused():
    from flowgraph.config import Config
    from flowgraph.errors import ConfigError
    from flowgraph.rl.modules import RewardInference
    from flowgraph.rl.preference import DPOReference

    runtime = {"sample_per_episode": 8, "num_inference_per_prompt": 2, "response_length": 4}
    reward = RewardInference("reward")
    reward.config = Config(runtime=runtime, models={"reward": {"args": {"filter_groups": True}}})
    words = r"drops groups, but one optimizer step takes train_global_batch_size=16 of .* 16 rows"
    with pytest.raises(ConfigError, match=words):
        reward.setup()
    reward.config = Config(runtime={**runtime, "train_global_batch_size": 8},
                           models={"reward": {"args": {"filter_groups": True}}})  # fmt: skip
    reward.setup()  # over-sampled: fine
    pairs = DPOReference("reference")
    pairs.config = Config(runtime={**runtime, "train_global_batch_size": 16})
    with pytest.raises(ConfigError, match=r"at most one pair of each of the episode's 8 prompts"):
        pairs.pair_step({})

"""Mixed precision (``models.<name>.precision``): dtypes where they belong, syncs exact
against a cast of the trainer, bf16 training close to fp32, exact resume, the cost model
and the errors.

The runs are small on purpose: on a CPU without bf16 instructions (AVX2 only) bf16
matmuls are emulated and about ten times slower than fp32 ones.
"""

import json

import pytest
import torch

import flowgraph
from flowgraph import Engine, Environment, Trainer
from flowgraph.compiler.cluster import ClusterSpec
from flowgraph.config import load_config
from flowgraph.errors import ConfigError, ParameterSyncError
from flowgraph.precision import auto_precision, cpu_has_native_bf16, resolve
from flowgraph.rl.modules import GPTModule, SFTTrainer
from flowgraph.rl.tasks import digit_prompts
from flowgraph.runtime.sync import SyncPlan
from spmd import hosted_parameters, run_job
from test_checkpoint import metrics_lines, same
from test_examples import EXAMPLES, QUIET, load_example

TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32}
GRPO_MODELS = ("policy", "reference", "grpo_policy")


def grpo_run(tmp_path, precision: str, episodes: int = 3, *extra: str):
    """The GRPO example, shrunk, with every model in ``precision``."""
    grpo = load_example("grpo")
    settings = [
        f"runtime.num_episode={episodes}", f"runtime.log_dir={tmp_path / 'log'}",
        "runtime.sample_per_episode=16", "runtime.num_inference_per_prompt=4",
        "runtime.generation_batch_size=8", "runtime.train_micro_batch_size=16",
        "runtime.train_global_batch_size=32", "runtime.eval_episode_interval=0",
        "runtime.enable_eval_before_training=false", "runtime.validate_sync=true",
    ]  # fmt: skip
    for model in GRPO_MODELS:
        settings.append(f"models.{model}.precision={precision}")
        settings += [f"models.{model}.args.{k}={v}" for k, v in TINY.items()]
    return grpo, grpo.main([*QUIET, *settings, *extra])


def test_auto_is_bf16_only_where_the_hardware_computes_it(tmp_path):
    with_bf16 = tmp_path / "bf16"
    with_bf16.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_bf16\n")
    without = tmp_path / "avx2"
    without.write_text("processor : 0\nflags : fpu avx2 fma\n")
    assert cpu_has_native_bf16(str(with_bf16)) and not cpu_has_native_bf16(str(without))
    assert not cpu_has_native_bf16(str(tmp_path / "absent"))
    assert auto_precision("gpu") == "bf16"
    assert auto_precision("cpu") == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve("fp16", "cpu") == "fp16" and resolve("fp32", "gpu") == "fp32"


def test_bf16_inference_copies_are_exact_casts_of_fp32_trainers(tmp_path):
    grpo, _ = grpo_run(tmp_path, "bf16", episodes=2)
    trainer = dict(grpo.grpo_policy.sync_parameters())
    copy = dict(grpo.policy.sync_parameters())
    assert {t.dtype for t in trainer.values()} == {torch.float32}  # master weights
    assert {t.dtype for t in copy.values()} == {torch.bfloat16}
    for name, weight in trainer.items():
        assert torch.equal(copy[name], weight.to(torch.bfloat16)), name
    assert {t.dtype for _, t in grpo.reference.sync_parameters()} == {torch.bfloat16}


def test_validate_sync_compares_a_bf16_copy_with_the_cast_of_its_source():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 8)

    from flowgraph import TorchModule

    class Holder(TorchModule):
        def setup(self):
            torch.manual_seed(0)
            self.model = Net()

    trainer, copy = Holder("trainer"), Holder("copy")
    trainer.setup()
    copy.setup()
    copy.model.to(torch.bfloat16)
    with torch.no_grad():
        trainer.model.layer.weight.add_(0.001)
    plan = SyncPlan.build(trainer, copy)
    plan.apply()
    plan.validate()  # equal to the cast
    assert torch.equal(copy.model.layer.weight, trainer.model.layer.weight.to(torch.bfloat16))
    with torch.no_grad():
        copy.model.layer.weight.view(-1)[3] = copy.model.layer.weight.view(-1)[3].nextafter(
            torch.tensor(1.0, dtype=torch.bfloat16)
        )  # one bf16 ulp
    with pytest.raises(ParameterSyncError, match="layer.weight"):
        plan.validate()


class CountingTeacher(GPTModule):
    """The env of a supervised flow: every prompt followed by its digits counting up (a
    fixed target, so that fp32 and bf16 train on the very same batches)."""

    def setup(self) -> None:
        pass

    def forward_step(self, data: dict) -> dict:
        tok = self.tokenizer
        answers = ["".join(str((int(p[-1]) + i) % 10) for i in range(1, 7)) for p in data["prompt"]]
        ids, mask = tok.batch([p + a for p, a in zip(data["prompt"], answers, strict=True)])
        response = torch.zeros(len(ids), 6)
        response[:] = 1.0
        return {**data, "sequences": ids, "attention_mask": mask, "response_mask": response}


def sft_losses(tmp_path, precision: str) -> list[float]:
    teacher, student = CountingTeacher("teacher"), SFTTrainer("student")
    engine = Engine(
        Environment(lambda batch: teacher.forward_step(batch)),
        Trainer(lambda batch: student.train_step(batch)),
    ).set_dataset(digit_prompts(256, seed=0))
    args = {**TINY, "lr": 3e-3, "init_seed": 0}
    flowgraph.init({
        "runtime": {"num_episode": 8, "sample_per_episode": 32, "train_micro_batch_size": 16,
                    "prompt_length": 4, "response_length": 6, "log_episodes": False,
                    "progress": False, "log_dir": str(tmp_path)},
        "models": {"teacher": {"args": args},
                   "student": {"args": args, "precision": precision}},
    })  # fmt: skip
    return [r.metrics["student/loss"] for r in engine.learn() if r.episode > 0]


def test_bf16_training_follows_fp32_for_the_first_steps(tmp_path):
    """Eight optimizer steps on the same batches: the bf16 loss stays within 0.5 % of
    the fp32 one (measured: under 0.05 %), and the loss falls in both."""
    fp32 = sft_losses(tmp_path / "fp32", "fp32")
    bf16 = sft_losses(tmp_path / "bf16", "bf16")
    assert fp32[-1] < 0.8 * fp32[0]
    for step, (want, got) in enumerate(zip(fp32, bf16, strict=True)):
        assert abs(got - want) <= 0.005 * want, (step, want, got)
    assert fp32 != bf16  # bf16 really computed in bf16


def test_a_resumed_bf16_run_equals_an_uninterrupted_one(tmp_path):
    full, _ = grpo_run(tmp_path / "full", "bf16", 4)
    expected = {m.name: m.checkpoint_state() for m in (full.grpo_policy, full.policy)}
    checkpoints = [f"runtime.checkpoint_dir={tmp_path / 'ckpt'}", "runtime.save_episode_interval=2"]
    grpo_run(tmp_path / "resumed", "bf16", 3, *checkpoints)  # stops after 3, saved at 2
    resumed, _ = grpo_run(tmp_path / "resumed", "bf16", 4, *checkpoints)
    assert metrics_lines(tmp_path / "resumed" / "log") == metrics_lines(tmp_path / "full" / "log")
    for module in (resumed.grpo_policy, resumed.policy):
        assert same(module.checkpoint_state(), expected[module.name]), module.name
    meta = json.loads((tmp_path / "ckpt" / "episode_000002" / "meta.json").read_text())
    assert meta["precision"] == {"policy": "bf16", "reference": "bf16", "grpo_policy": "bf16",
                                 "reward": "fp32"}  # fmt: skip


def test_resuming_in_another_precision_says_so(tmp_path, caplog):
    checkpoints = [f"runtime.checkpoint_dir={tmp_path / 'ckpt'}", "runtime.save_episode_interval=1"]
    grpo_run(tmp_path / "a", "fp32", 1, *checkpoints)
    grpo_run(tmp_path / "b", "bf16", 2, *checkpoints)
    assert "models.policy computes in fp32 -> bf16" in caplog.text


def test_an_fp16_trainer_is_refused_with_the_fix():
    grpo = load_example("grpo")
    with pytest.raises(
        ConfigError, match="models.grpo_policy.precision: fp16 .* use precision: bf16"
    ):
        grpo.main([*QUIET, "models.grpo_policy.precision=fp16"])


def test_the_cost_model_counts_bytes_per_dtype():
    grpo = load_example("grpo")

    def placement(precision: str) -> dict:
        overrides = [f"models.{m}.precision={precision}" for m in GRPO_MODELS]
        config = load_config(str(EXAMPLES / "grpo.yaml"), [*overrides, "models.policy.params=1B",
                                                    "models.reference.params=1B",
                                                    "models.grpo_policy.params=1B"])  # fmt: skip
        plan = grpo.engine.compile(ClusterSpec.from_world_size(8), config)
        return {p.model: p for p in plan.placement}

    fp32, bf16 = placement("fp32"), placement("bf16")
    assert bf16["policy"].weights == fp32["policy"].weights / 2
    assert bf16["policy"].activations == fp32["policy"].activations / 2
    assert bf16["policy"].precision == "bf16"
    # a bf16 trainer keeps fp32 weights, gradients and Adam moments, plus the bf16 casts
    assert bf16["grpo_policy"].weights == fp32["grpo_policy"].weights * 6 / 4
    assert bf16["grpo_policy"].gradients == fp32["grpo_policy"].gradients
    assert bf16["grpo_policy"].optimizer == fp32["grpo_policy"].optimizer
    bf16_config = load_config(
        str(EXAMPLES / "grpo.yaml"), [f"models.{m}.precision=bf16" for m in GRPO_MODELS]
    )
    table = grpo.engine.compile(ClusterSpec.from_world_size(8), bf16_config).placement_table()
    assert "inference  bf16" in table and "trainer    bf16" in table


@pytest.mark.slow
def test_a_cross_rank_sync_into_a_bf16_copy_is_exact(tmp_path):
    runtime = {"num_episode": 2, "sample_per_episode": 8, "generation_batch_size": 4,
               "train_micro_batch_size": 2, "train_global_batch_size": 8,
               "eval_episode_interval": 0, "log_episodes": False, "validate_sync": True,
               "colocation": [["policy", "reference", "value", "reward"],
                              ["ppo_policy", "ppo_value"]]}  # fmt: skip
    models = {m: {"num_gpu": 1} for m in ("policy", "reference", "value", "reward",
                                          "ppo_policy", "ppo_value")}  # fmt: skip
    for model in ("policy", "value", "reference"):
        models[model]["precision"] = "bf16"
    result = run_job(tmp_path, {"runtime": runtime, "models": models}, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    params = hosted_parameters(tmp_path)
    for src, dst in (("ppo_policy", "policy"), ("ppo_value", "value")):
        for name, weight in params[src].items():
            assert weight.dtype == torch.float32
            assert params[dst][name].dtype == torch.bfloat16
            assert torch.equal(params[dst][name], weight.to(torch.bfloat16)), (dst, name)

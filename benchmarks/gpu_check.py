"""The CUDA path end to end, one line per check (``make gpu-check``; a few minutes on one GPU).

    python benchmarks/gpu_check.py                 # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu    # the same checks on the CPU (a smoke test)

Checks, each printed as ``gpu-check <name>: OK|FAIL <details>``:

- ``ppo-bf16``, ``grpo-bf16``: a 1-rank run of the PPO and GRPO examples with every model in
  bf16, every network on the device, the inference copies exact casts of their trainers
  after the colocated sync (``validate_sync`` on);
- ``offload``: a trainer's device memory before and after ``FREE``, and the same bytes back
  after ``LOAD``;
- ``deepspeed-zero2``: a DeepSpeed ZeRO-2 trainer's steps on the device (bf16 autocast);
- ``checkpoint-resume``: a GRPO run checkpointed at episode 2 and resumed equals the
  uninterrupted run, and the checkpoint holds the CUDA RNG state;
- ``generation``: tokens/s of the bench policy (4 x 256, vocabulary 1024), 128 rows x 32
  tokens in bf16, against Hugging Face ``generate()`` of a GPT-2 of the same shape.

The exit code is the number of failed checks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import load_example  # noqa: E402

QUIET = ["runtime.log_episodes=false", "runtime.progress=false"]
RESULTS: list[tuple[str, bool, str]] = []


def check(name: str):
    """Run the decorated function now; record and print OK with its details, or FAIL."""

    def run(fn):
        start = time.perf_counter()
        try:
            details, ok = fn(), True
        except Exception as err:  # noqa: BLE001 - every failure is reported, then the next check
            details, ok = f"{type(err).__name__}: {err}", False
            traceback.print_exc(file=sys.stderr)
        seconds = time.perf_counter() - start
        print(f"gpu-check {name}: {'OK' if ok else 'FAIL'} {details} ({seconds:.1f} s)", flush=True)
        RESULTS.append((name, ok, details))
        return fn

    return run


def bf16(models: tuple[str, ...]) -> list[str]:
    return [f"models.{m}.precision=bf16" for m in models]


def on_device(module, device: str) -> bool:
    return all(p.device.type == device for _, p in module.sync_parameters())


def exact_cast(trainer, copy) -> bool:
    source = dict(trainer.sync_parameters())
    return all(torch.equal(t, source[n].to(t.dtype)) for n, t in copy.sync_parameters())


def run_example(name: str, models: tuple[str, ...], log_dir: str, *extra: str):
    example = load_example(name)
    settings = [f"runtime.log_dir={log_dir}", "runtime.validate_sync=true", *QUIET]
    return example, example.main([*settings, *bf16(models), *extra])


def main(device: str) -> int:
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (run with --device cpu for the smoke test)")
        return 1
    os.environ["FLOWGRAPH_DEVICE"] = device
    tmp = tempfile.mkdtemp(prefix="gpu_check_")

    @check("ppo-bf16")
    def ppo_bf16():
        models = ("policy", "reference", "value", "ppo_policy", "ppo_value")
        ppo, records = run_example("ppo", models, f"{tmp}/ppo", "runtime.num_episode=3")
        assert all(on_device(getattr(ppo, m), device) for m in models), "a model is not on it"
        assert exact_cast(ppo.ppo_policy, ppo.policy) and exact_cast(ppo.ppo_value, ppo.value)
        seconds = statistics.median(r.seconds for r in records[1:])
        return f"{seconds:.2f} s/episode, reward {records[-1].metrics['ppo_policy/reward']:.3f}"

    @check("grpo-bf16")
    def grpo_bf16():
        models = ("policy", "reference", "grpo_policy")
        grpo, records = run_example("grpo", models, f"{tmp}/grpo", "runtime.num_episode=3")
        assert all(on_device(getattr(grpo, m), device) for m in models), "a model is not on it"
        assert exact_cast(grpo.grpo_policy, grpo.policy), "the bf16 copy is not the cast"
        seconds = statistics.median(r.seconds for r in records[1:])
        return f"{seconds:.2f} s/episode, sync exact"

    @check("offload")
    def offload():
        from flowgraph.config import load_config
        from flowgraph.rl.modules import GRPOTrainer
        from flowgraph.runtime.offload import Offload

        trainer = GRPOTrainer("grpo_policy")
        trainer.config = load_config(str(ROOT / "examples" / "grpo_bench.yaml"))
        trainer.trainable = True
        trainer.setup()
        before = [p.detach().cpu().clone() for p in trainer.model.parameters()]
        used = _allocated(device)
        moved = Offload(trainer)
        moved.free()
        freed = _allocated(device)
        moved.load()
        after = [p.detach().cpu() for p in trainer.model.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        if device == "cuda":
            assert freed < used, "device memory was not freed"
        return f"device memory {used / 2**20:.1f} MiB -> {freed / 2**20:.1f} MiB, same bytes back"

    @check("deepspeed-zero2")
    def deepspeed_zero2():
        return _deepspeed_steps(tmp)

    @check("checkpoint-resume")
    def checkpoint_resume():
        models = ("policy", "reference", "grpo_policy")
        _, full = run_example("grpo", models, f"{tmp}/full", "runtime.num_episode=3")
        ckpt = [f"runtime.checkpoint_dir={tmp}/ckpt", "runtime.save_episode_interval=2"]
        run_example("grpo", models, f"{tmp}/part", "runtime.num_episode=2", *ckpt)
        _, resumed = run_example("grpo", models, f"{tmp}/part", "runtime.num_episode=3", *ckpt)
        assert [r.metrics for r in resumed] == [r.metrics for r in full], "resume is not exact"
        rng = torch.load(f"{tmp}/ckpt/episode_000002/rng_rank0.pt", weights_only=True)
        if device == "cuda":
            assert "cuda" in rng, "no CUDA RNG state in the checkpoint"
        return f"exact after resume at episode 2, RNG states saved: {', '.join(sorted(rng))}"

    @check("generation")
    def generation():
        return _generation_speed(device)

    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"gpu-check: {len(RESULTS) - len(failed)}/{len(RESULTS)} passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))  # fmt: skip
    return len(failed)


def _allocated(device: str) -> int:
    if device != "cuda":
        return 0
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def _deepspeed_steps(tmp: str) -> str:
    import flowgraph
    from flowgraph import DeepSpeedModule, Engine, Environment, Trainer

    class Data(flowgraph.BaseModule):
        def forward_step(self, data):
            x = torch.stack([torch.tensor(v, dtype=torch.float32) for v in data["x"]])
            device = "cuda" if os.environ["FLOWGRAPH_DEVICE"] == "cuda" else "cpu"
            return {"x": x.to(device), "y": x.sum(1).to(device)}

    class Regression(DeepSpeedModule):
        def setup(self):
            device = "cuda" if os.environ["FLOWGRAPH_DEVICE"] == "cuda" else "cpu"
            self.model = torch.nn.Sequential(
                torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
            )
            if not any(p.is_meta for p in self.model.parameters()):  # the compiler sizes it
                self.model.to(device)
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)

        def train_step(self, micro_batches):
            for mb in micro_batches:
                loss = ((self.engine(mb["x"]).squeeze(-1).float() - mb["y"]) ** 2).mean()
                self.engine.backward(loss)
                self.engine.step()
            return {"loss": loss.item()}

    data, trainer = Data("data"), Regression("regression")
    engine = Engine(
        Environment(lambda batch: data.forward_step(batch)),
        Trainer(lambda batch: trainer.train_step(batch)),
    ).set_dataset([{"x": [float((i * j) % 7) / 7 for j in range(8)]} for i in range(256)])
    flowgraph.init({
        "runtime": {"num_episode": 3, "sample_per_episode": 64, "train_micro_batch_size": 16,
                    "log_episodes": False, "progress": False, "log_dir": f"{tmp}/ds"},
        "models": {"regression": {"backend": "deepspeed", "zero_stage": 2,
                                  "precision": "bf16"}},
    })  # fmt: skip
    records = engine.learn()
    losses = [r.metrics["regression/loss"] for r in records if r.episode > 0]
    assert all(loss == loss for loss in losses), f"a loss is NaN: {losses}"
    return f"3 episodes x 4 ZeRO-2 steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def _generation_speed(device: str) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    from flowgraph.rl.gpt import GPTConfig, TinyGPT
    from flowgraph.rl.sampling import generate

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows, new = 128, 32
    torch.manual_seed(0)
    ours = TinyGPT(GPTConfig(vocab_size=1024, n_layer=4, n_head=4, n_embd=256, max_seq_len=64))
    ours = ours.to(device, dtype).eval()
    theirs = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1024,
                                        n_positions=64)).to(device, dtype).eval()  # fmt: skip
    ids = torch.randint(3, 13, (rows, 8), device=device)
    mask = torch.ones_like(ids)

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return rows * new / statistics.median(times)

    mine = timed(lambda: generate(ours, ids, mask, new, temperature=1.0))
    with torch.no_grad():
        hf = timed(lambda: theirs.generate(ids, attention_mask=mask, do_sample=True, top_k=0,
                                           max_new_tokens=new, min_new_tokens=new,
                                           pad_token_id=0))  # fmt: skip
    return f"{mine:,.0f} tok/s vs Hugging Face generate() {hf:,.0f} tok/s ({dtype})"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    sys.exit(main(parser.parse_args().device))

"""Checkpoints: atomic writes, damaged ones skipped, exact resume, kill-and-resume."""

import json
import logging
import random
from pathlib import Path

import pytest
import torch

from flowgraph.config import load_config
from flowgraph.errors import CheckpointError, ConfigError
from flowgraph.runtime.checkpoint import Checkpoint, CheckpointStore, check_compatible
from spmd import hosted_parameters, records, run_job
from test_examples import QUIET, load_example


def write(directory: Path, name: str, data: bytes = b"x" * 100) -> None:
    (directory / name).write_bytes(data)


def test_a_save_publishes_meta_files_and_latest_and_keeps_the_newest(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for episode in (1, 2, 3):
        store.save(episode, lambda d: write(d, "model_a.pt"), {"fingerprint": "f"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "episode_000002", "episode_000003", "latest"]  # fmt: skip
    assert (tmp_path / "latest").read_text().strip() == "episode_000003"
    found = store.newest_valid()
    assert found.episode == 3 and found.meta["files"] == {"model_a.pt": 100}
    assert found.meta["world_size"] == 1


def test_a_kill_while_writing_leaves_the_previous_checkpoint_usable(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    store.save(1, lambda d: write(d, "model_a.pt"), {"fingerprint": "f"})

    def dies_halfway(directory):
        write(directory, "model_a.pt", b"half")
        raise KeyboardInterrupt  # stands for SIGKILL: nothing after this line runs

    with pytest.raises(KeyboardInterrupt):
        store.save(2, dies_halfway, {"fingerprint": "f"})
    assert (tmp_path / "episode_000002.tmp").is_dir()  # the unfinished one, never published
    assert (tmp_path / "latest").read_text().strip() == "episode_000001"
    assert store.newest_valid().episode == 1
    store.save(2, lambda d: write(d, "model_a.pt"), {"fingerprint": "f"})
    assert not (tmp_path / "episode_000002.tmp").exists()
    assert store.newest_valid().episode == 2


def test_a_checkpoint_dir_that_a_rank_cannot_see_names_the_fix(tmp_path):
    # rank 1 of a job whose rank 0 writes to a disk this rank does not share
    store = CheckpointStore(tmp_path / "node-local", keep=3, rank=1, world_size=2)
    with pytest.raises(CheckpointError, match="not on storage shared by all ranks"):
        store.save(1, lambda d: write(d, "rng_rank1.pt"), {})


def test_a_truncated_file_is_skipped_with_a_warning(tmp_path, caplog):
    store = CheckpointStore(tmp_path, keep=3)
    for episode in (1, 2):
        store.save(episode, lambda d: write(d, "model_a.pt"), {"fingerprint": "f"})
    (tmp_path / "episode_000002" / "model_a.pt").write_bytes(b"x" * 40)
    with caplog.at_level(logging.WARNING, logger="flowgraph"):
        assert store.newest_valid().episode == 1
    assert "skipping damaged checkpoint" in caplog.text
    assert "model_a.pt has 40 bytes, 100 were written (truncated)" in caplog.text


def test_checksums_catch_a_flipped_bit_that_the_size_check_cannot(tmp_path):
    store = CheckpointStore(tmp_path, keep=3, checksums=True)
    store.save(1, lambda d: torch.save({"w": torch.zeros(1000)}, d / "model_a.pt"), {})
    checkpoint = store.newest_valid()
    assert set(checkpoint.meta["crc32"]) == {"model_a.pt"}
    path = checkpoint.path / "model_a.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor bytes: torch.load would not notice
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model_a.pt fails its CRC32 check"):
        checkpoint.load("model_a.pt")


def test_an_unreadable_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    checkpoints = [f"runtime.checkpoint_dir={tmp_path / 'ckpt'}", "runtime.save_episode_interval=1",
                   "runtime.checkpoint_checksums=true"]  # fmt: skip
    ppo, full = ppo_run(tmp_path / "full", 3)
    expected = ppo.ppo_policy.checkpoint_state()
    ppo_run(tmp_path / "resumed", 2, *checkpoints)
    path = tmp_path / "ckpt" / "episode_000002" / "model_ppo_policy.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="flowgraph"):
        ppo, resumed = ppo_run(tmp_path / "resumed", 3, *checkpoints)
    assert "fails its CRC32 check" in caplog.text
    assert "skipping damaged checkpoint" in caplog.text
    assert [r.metrics for r in resumed] == [r.metrics for r in full]
    assert same(ppo.ppo_policy.checkpoint_state(), expected)


def test_checkpoints_of_other_flows_or_split_state_on_other_world_sizes_are_refused(tmp_path):
    checkpoint = Checkpoint(tmp_path, {"episode": 4, "world_size": 2, "fingerprint": "aaa",
                                       "files": {}})  # fmt: skip
    with pytest.raises(CheckpointError, match="written by different flows or models"):
        check_compatible(checkpoint, "bbb", 2, [])
    with pytest.raises(CheckpointError, match=r"written by 2 rank\(s\) and this run has 4.*"
                       r"DeepSpeed state of ppo_policy.*--nproc-per-node 2"):  # fmt: skip
        check_compatible(checkpoint, "aaa", 4, ["ppo_policy"])
    check_compatible(checkpoint, "aaa", 4, [])  # replicated state: re-sharded as it loads
    checkpoint.meta["plan_hash"] = "p1"
    with pytest.raises(CheckpointError, match="written under another placement"):
        check_compatible(checkpoint, "aaa", 2, ["ppo_policy"], plan_hash="p2")
    check_compatible(checkpoint, "aaa", 2, [], plan_hash="p2")


def test_an_interval_without_a_directory_is_a_config_error():
    with pytest.raises(ConfigError, match="set runtime.checkpoint_dir"):
        load_config({"runtime": {"save_episode_interval": 2}})


# -- resuming the PPO example in one process ------------------------------------------------
def ppo_run(tmp_path, episodes, *extra):
    ppo = load_example("ppo")
    settings = [f"runtime.num_episode={episodes}", f"runtime.log_dir={tmp_path / 'log'}"]
    history = ppo.main([*QUIET, *settings, "runtime.eval_episode_interval=2", *extra])
    return ppo, history


def same(a, b) -> bool:
    """Equal nested state: tensors bit for bit."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def metrics_lines(log_dir: Path) -> list[tuple]:
    lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["episode"], r["metrics"]) for r in map(json.loads, lines)]


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    ppo, full = ppo_run(tmp_path / "full", 5)
    expected = {m.name: m.checkpoint_state() for m in (ppo.ppo_policy, ppo.ppo_value, ppo.policy)}
    checkpoints = [f"runtime.checkpoint_dir={tmp_path / 'ckpt'}", "runtime.save_episode_interval=2"]
    _, partial = ppo_run(tmp_path / "resumed", 3, *checkpoints)  # stops after 3, saved at 2
    ppo, resumed = ppo_run(tmp_path / "resumed", 5, *checkpoints)
    assert [r.episode for r in resumed] == [0, 1, 2, 3, 4, 5]

    # episodes 0-2 come from the checkpoint (their measured times too), 3-5 ran again; the
    # checkpoint keeps a record as it was before the checkpoint's own time was added to it
    def measured(record):
        return {k: v for k, v in record.stages.items() if k != "checkpoint"}

    assert [measured(r) for r in resumed[:3]] == [measured(r) for r in partial[:3]]
    assert resumed[3].stages != partial[3].stages
    assert [r.metrics for r in resumed] == [r.metrics for r in full]
    assert metrics_lines(tmp_path / "resumed" / "log") == metrics_lines(tmp_path / "full" / "log")
    for module in (ppo.ppo_policy, ppo.ppo_value, ppo.policy):
        assert same(module.checkpoint_state(), expected[module.name]), module.name
    assert "checkpoint" in resumed[4].stages and "checkpoint" not in resumed[5].stages
    saved = json.loads((tmp_path / "ckpt" / "episode_000004" / "meta.json").read_text())
    # policy was just recomputed by the sync, so only what cannot be recomputed is kept
    assert saved["models"] == ["reference", "reward", "ppo_policy", "ppo_value"]
    # 128 samples per episode; 2 epochs x 128 rows / 64 per step = 4 optimizer steps each
    assert saved["data"] == {"episode": 4, "seed": 1, "samples": 512, "optimizer_steps": 16}


def test_resuming_with_changed_settings_says_which(tmp_path, caplog):
    checkpoints = [f"runtime.checkpoint_dir={tmp_path / 'ckpt'}", "runtime.save_episode_interval=1"]
    ppo_run(tmp_path, 1, *checkpoints)
    with caplog.at_level(logging.WARNING, logger="flowgraph"):
        ppo_run(tmp_path, 2, *checkpoints, "models.ppo_policy.args.lr=0.001")
    assert "settings that differ from the checkpoint's" in caplog.text
    assert "models.ppo_policy.args.lr: 0.003 -> 0.001" in caplog.text
    assert "num_episode" not in caplog.text


def test_resume_false_starts_afresh(tmp_path):
    checkpoints = [f"runtime.checkpoint_dir={tmp_path / 'ckpt'}", "runtime.save_episode_interval=1"]
    ppo_run(tmp_path, 2, *checkpoints)
    _, again = ppo_run(tmp_path, 1, *checkpoints, "runtime.resume=false")
    assert [r.episode for r in again] == [0, 1]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "episode_000001"


def test_resuming_another_flow_names_the_fix(tmp_path):
    checkpoints = [f"runtime.checkpoint_dir={tmp_path}", "runtime.save_episode_interval=1"]
    ppo_run(tmp_path, 1, *checkpoints)
    grpo = load_example("grpo")
    with pytest.raises(CheckpointError, match="runtime.resume=false or another"):
        grpo.main([*QUIET, "runtime.num_episode=2", *checkpoints])


# -- several processes ----------------------------------------------------------------------
RUNTIME = {
    "num_episode": 4,
    "sample_per_episode": 16,
    "generation_batch_size": 4,
    "train_micro_batch_size": 2,
    "train_global_batch_size": 8,
    "eval_episode_interval": 2,
    "enable_eval_before_training": True,
    "log_episodes": False,
    "progress": False,
    "save_episode_interval": 1,
}


def job_config(out: Path, **runtime) -> dict:
    return {"runtime": {**RUNTIME, "checkpoint_dir": str(out / "ckpt"),
                        "log_dir": str(out / "log"), **runtime}}  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_job(out, job_config(out), nproc=2, script=Path(__file__).parent / "kill_job.py")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_rank_killed_mid_episode_is_restarted_and_resumes_exactly(tmp_path, uninterrupted, seed):
    draw = random.Random(seed)
    fault = {"FLOWGRAPH_TEST_KILL_RANK": str(draw.randrange(2)),
             "FLOWGRAPH_TEST_KILL_AT": str(draw.randrange(8, 48))}  # fmt: skip
    result = run_job(tmp_path, job_config(tmp_path, timeout_s=20), nproc=2,
                     script=Path(__file__).parent / "kill_job.py", env=fault,
                     torchrun_args=("--max-restarts", "1"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    killed = (tmp_path / "killed.txt").read_text()  # written just before the SIGKILL
    killed_in = int(killed.split("(episode ")[1].rstrip(")"))
    if killed_in >= 2:  # episode 1 was checkpointed before the kill
        assert f"resuming from checkpoint {tmp_path / 'ckpt'}/episode_" in result.stdout
    assert records(tmp_path) and [r["metrics"] for r in records(tmp_path)] == [
        r["metrics"] for r in records(uninterrupted)]  # fmt: skip
    assert metrics_lines(tmp_path / "log") == metrics_lines(uninterrupted / "log")
    trainers = torch.load(tmp_path / "trainers.pt", weights_only=True)
    assert same(trainers, torch.load(uninterrupted / "trainers.pt", weights_only=True))
    expected = hosted_parameters(uninterrupted)
    for model, params in hosted_parameters(tmp_path).items():
        assert same(params, expected[model]), model


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_killed_while_writing_a_checkpoint_resumes_from_the_one_before(
    tmp_path, uninterrupted, rank
):
    fault = {"FLOWGRAPH_TEST_KILL_RANK": str(rank), "FLOWGRAPH_TEST_KILL_IN_SAVE": "2"}
    result = run_job(tmp_path, job_config(tmp_path, timeout_s=20), nproc=2,
                     script=Path(__file__).parent / "kill_job.py", env=fault,
                     torchrun_args=("--max-restarts", "1"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(episode 2)" in (tmp_path / "killed.txt").read_text()
    assert f"resuming from checkpoint {tmp_path / 'ckpt' / 'episode_000001'} " in result.stdout
    assert metrics_lines(tmp_path / "log") == metrics_lines(uninterrupted / "log")
    trainers = torch.load(tmp_path / "trainers.pt", weights_only=True)
    assert same(trainers, torch.load(uninterrupted / "trainers.pt", weights_only=True))


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_in_one_process(tmp_path, uninterrupted):
    result = run_job(tmp_path, job_config(tmp_path, num_episode=2), nproc=2,
                     script=Path(__file__).parent / "kill_job.py")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_job(tmp_path, job_config(tmp_path), nproc=1,
                     script=Path(__file__).parent / "kill_job.py")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "is re-sharded as it loads" in result.stderr
    assert [r["episode"] for r in records(tmp_path)] == [0, 1, 2, 3, 4]
    # Episodes 3-4 ran in one process from the 2-rank checkpoint: the numbers of the run
    # that stayed on 2 ranks (placement-independent, so equal up to float sum order).
    for ours, theirs in zip(records(tmp_path), records(uninterrupted), strict=True):
        assert ours["metrics"].keys() == theirs["metrics"].keys()
        for key, value in theirs["metrics"].items():
            assert ours["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    trainers = torch.load(tmp_path / "trainers.pt", weights_only=True)
    expected = torch.load(uninterrupted / "trainers.pt", weights_only=True)
    for model, state in expected.items():
        for name, tensor in state["model"].items():
            torch.testing.assert_close(trainers[model]["model"][name], tensor, rtol=1e-5,
                                       atol=1e-6, msg=f"{model}.{name}")  # fmt: skip
        moments = state["optimizer"]["state"]
        for index, values in moments.items():
            for key, tensor in values.items():
                got = trainers[model]["optimizer"]["state"][index][key]
                torch.testing.assert_close(got, tensor, rtol=1e-5, atol=1e-6)

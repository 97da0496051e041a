"""tests/spmd_job.py with a fault: on torchrun's first attempt, rank KILL_RANK kills
itself with SIGKILL just before its KILL_AT-th instruction (FLOWGRAPH_TEST_KILL_RANK,
FLOWGRAPH_TEST_KILL_AT), or, with FLOWGRAPH_TEST_KILL_IN_SAVE=E, right after writing its
first file of the checkpoint of episode E; the restarted attempt runs clean. Also saves
every trainer's checkpoint state (weights and optimizer) to OUT_DIR/trainers.pt on rank 0.

    torchrun --max-restarts 1 --nproc-per-node 2 tests/kill_job.py OUT_DIR CONFIG_JSON
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import spmd_job  # noqa: E402
from flowgraph.runtime import resume  # noqa: E402
from flowgraph.runtime.interpreter import Interpreter  # noqa: E402


def die(where: str) -> None:
    with open(os.path.join(sys.argv[1], "killed.txt"), "w") as marker:
        marker.write(f"rank {os.environ['RANK']} {where}")
    os.kill(os.getpid(), signal.SIGKILL)


def arm() -> None:
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    victim = os.environ.get("FLOWGRAPH_TEST_KILL_RANK")
    if victim is None or not first_attempt or os.environ.get("RANK") != victim:
        return
    if "FLOWGRAPH_TEST_KILL_IN_SAVE" in os.environ:
        episode_dir = f"episode_{int(os.environ['FLOWGRAPH_TEST_KILL_IN_SAVE']):06d}.tmp"
        save_object = resume.save_object

        def save_then_die(obj, path):
            save_object(obj, path)
            if path.parent.name == episode_dir:
                die(f"after writing {path.name} (episode {episode_dir[8:14].lstrip('0')})")

        resume.save_object = save_then_die
        return
    kill_at, executed = int(os.environ["FLOWGRAPH_TEST_KILL_AT"]), [0]
    execute = Interpreter._execute

    def execute_or_die(self, run):
        executed[0] += 1
        if executed[0] == kill_at:
            die(f"before `{run[0]}` (episode {self.episode.number})")
        return execute(self, run)

    Interpreter._execute = execute_or_die


if __name__ == "__main__":
    arm()
    out_dir = sys.argv[1]
    spmd_job.main(out_dir, sys.argv[2])
    if os.environ.get("RANK", "0") == "0":
        trainers = {m.name: m.checkpoint_state() for m in spmd_job.MODULES if m.trainable}
        torch.save(trainers, os.path.join(out_dir, "trainers.pt"))

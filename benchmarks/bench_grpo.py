"""The standard GRPO comparison: examples/grpo.py with examples/grpo_bench.yaml.

python benchmarks/bench_grpo.py [EPISODES]

One optimizer step per episode. Reports seconds per step (median of steps 2-10),
prompts/s, generated tokens/s, the per-stage breakdown, and the step and seconds at which
the mean reward first passes 0.9.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from common import load_example, report

from flowgraph.config import current_config

ROOT = Path(__file__).parent.parent


def main(episodes: int = 40) -> list[dict]:
    grpo = load_example("grpo")
    with tempfile.TemporaryDirectory() as log_dir:
        records = grpo.main(["--config", str(ROOT / "examples" / "grpo_bench.yaml"),
                             f"runtime.num_episode={episodes}", "runtime.log_episodes=false",
                             "runtime.progress=false", f"runtime.log_dir={log_dir}"])  # fmt: skip
    steps = [r for r in records if r.episode > 0]
    group = current_config().runtime.num_inference_per_prompt
    window = steps[1:10]
    seconds = statistics.median(r.seconds for r in window)
    results = [
        report("GRPO bench: seconds per step (median of steps 2-10)", seconds, "s"),
        report(
            "GRPO bench: prompts/s",
            statistics.median(r.samples / r.seconds for r in window),
            "prompt/s",
        ),  # fmt: skip
        report(
            "GRPO bench: generated tokens/s (policy stage)",
            statistics.median(
                r.samples
                * group
                * r.metrics["grpo_policy/response_length"]
                / r.stages["env/policy"]
                for r in window
            ),
            "tok/s",
        ),  # fmt: skip
    ]
    for stage in ("env/policy", "env/reference", "env/reward", "train", "sync"):
        share = statistics.median(r.stages.get(stage, 0.0) / r.seconds for r in window)
        results.append(report(f"GRPO bench: share of the step in {stage}", share * 100, "%"))
    elapsed, passed = 0.0, None
    for r in steps:
        elapsed += r.seconds
        if r.metrics["grpo_policy/reward"] > 0.9:
            passed = (r.episode, elapsed)
            break
    if passed:
        results.append(report("GRPO bench: steps until mean reward > 0.9", passed[0], "steps"))
        results.append(report("GRPO bench: seconds until mean reward > 0.9", passed[1], "s"))
    else:
        final = steps[-1].metrics["grpo_policy/reward"]
        results.append(report(f"GRPO bench: reward after {episodes} steps (not > 0.9)", final, ""))
    return results


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)

"""Datasets from files: resident memory per rank when training on a 10 MB JSONL or
Parquet file, against the same rows loaded into a Python list on every rank.

    python benchmarks/bench_data.py                 # 2 rounds, about 2 minutes
    python benchmarks/bench_data.py --rounds 3

Each run is ``torchrun --nproc-per-node 2`` of this file's worker: it builds
examples/grpo.py, gives it its data (``list``: the JSONL parsed with ``json`` into a list
on every rank, as scripts did before; ``jsonl`` / ``parquet``: ``runtime.data_path``),
trains 2 episodes, and reports its anonymous resident memory (``RssAnon``: the process's
own pages; a memory-mapped file's pages are shared page cache and not counted there) and
its total resident memory (``VmRSS``) before the data and after training; ``none``
trains on the example's own 8,192 prompts, so ``growth - growth(none)`` is the data's
share. ``datasets`` is imported before the first figure in every variant (a fixed cost of
the library, about 100 MB, not of the data). A fresh
``HF_DATASETS_CACHE`` per run, so every file run includes the one-time Arrow conversion.
Variants alternate (reversed on odd rounds); figures are medians over rounds of the
larger of the two ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import string
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import report  # noqa: E402

VARIANTS = ["none", "list", "jsonl", "parquet"]
SIZE_MB = 10


def status_mb(field: str) -> float:
    """``field`` (e.g. ``RssAnon``) of /proc/self/status in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def make_files(directory: Path) -> dict[str, Path]:
    """A JSONL file of about SIZE_MB MB (4-digit prompts with a 500-character context
    column) and a Parquet file of the same rows."""
    import datasets

    from flowgraph.rl.tasks import digit_prompts

    jsonl = directory / "prompts.jsonl"
    with jsonl.open("w") as handle:
        rows = 0
        while handle.tell() < SIZE_MB * 1_000_000:
            prompt = digit_prompts(1, seed=rows)[0]
            context = "".join(random.choice(string.ascii_letters) for _ in range(500))
            handle.write(json.dumps({"prompt": prompt, "id": rows, "context": context}) + "\n")
            rows += 1
    parquet = directory / "prompts.parquet"
    datasets.Dataset.from_json(str(jsonl), cache_dir=str(directory / "conversion")).to_parquet(
        str(parquet)
    )
    return {"jsonl": jsonl, "parquet": parquet}


def worker(variant: str, path: str, out: str) -> None:
    """One rank: data as ``variant``, 2 training episodes, memory before and after."""
    import datasets  # noqa: F401  (the library's own memory is not the data's)
    from common import load_example

    grpo = load_example("grpo")
    before = {"anon": status_mb("RssAnon"), "rss": status_mb("VmRSS")}
    overrides = ["runtime.num_episode=2", "runtime.sample_per_episode=16",
                 "runtime.generation_batch_size=16", "runtime.train_global_batch_size=128",
                 "runtime.eval_episode_interval=0", "runtime.enable_eval_before_training=false",
                 "runtime.log_episodes=false", "runtime.progress=false"]  # fmt: skip
    if variant == "list":
        with open(path) as handle:
            grpo.engine.set_dataset([json.loads(line) for line in handle])
    elif variant != "none":
        overrides.append(f"runtime.data_path={path}")
    grpo.main(overrides)
    after = {"anon": status_mb("RssAnon"), "rss": status_mb("VmRSS")}
    rank = os.environ.get("RANK", "0")
    Path(out, f"rank{rank}.json").write_text(json.dumps({"before": before, "after": after}))


def run(variant: str, files: dict[str, Path], directory: Path) -> dict[str, float]:
    """One torchrun job of ``variant``; the growth of each memory figure, the larger rank."""
    out = Path(tempfile.mkdtemp(dir=directory))
    path = files.get(variant, files["jsonl"])
    env = {**os.environ, "HF_DATASETS_CACHE": str(out / "cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", __file__, "--worker", variant, str(path),
               str(out)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise RuntimeError(f"{variant} run failed:\n{result.stderr[-3000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return {key: max(r["after"][key] - r["before"][key] for r in ranks) for key in ("anon", "rss")}


def main(rounds: int = 2) -> list[dict]:
    directory = Path(tempfile.mkdtemp(prefix="bench_data_"))
    files = make_files(directory)
    size = files["jsonl"].stat().st_size / 1e6
    print(f"datasets from files: {size:.1f} MB JSONL, "
          f"{files['parquet'].stat().st_size / 1e6:.1f} MB Parquet; torchrun 2 ranks, "
          f"{rounds} rounds, growth per rank (RssAnon / VmRSS MB)")  # fmt: skip
    growth: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for i in range(rounds):
        for variant in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
            growth[variant].append(run(variant, files, directory))
    medians = {v: {k: statistics.median(g[k] for g in growth[v]) for k in ("anon", "rss")}
               for v in VARIANTS}  # fmt: skip
    results = []
    for variant in VARIANTS:
        anon, rss = medians[variant]["anon"], medians[variant]["rss"]
        net = anon - medians["none"]["anon"]
        print(
            f"  {variant:8s} RssAnon +{anon:6.1f} MB (data: {net:+6.1f} MB)   VmRSS +{rss:6.1f} MB"
        )
        if variant != "none":
            results.append(report(f"data {variant}: anonymous memory per rank", net, "MB"))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "PATH", "OUT"))
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
    else:
        main(args.rounds)

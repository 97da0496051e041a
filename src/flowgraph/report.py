"""``flowc report RUN_DIR``: a finished (or running) run's summary, curves and timeline.

Reads ``RUN_DIR/metrics.jsonl`` (and ``RUN_DIR/trace.json`` when the run had
``runtime.trace: true``); prints episodes, throughput, the median time of every stage
and the first/last/min/max of every metric; draws ``metrics.png`` (reward, KL and loss
curves) and ``timeline.png`` (one row per rank, one bar per executed instruction).

Example::

    >>> import json, tempfile, pathlib
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> lines = [{"episode": e, "samples": 8, "seconds": 0.5, "stages": {"env": 0.2, "train": 0.3},
    ...           "metrics": {"reward": e / 10}} for e in (1, 2, 3)]
    >>> _ = (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\\n" for x in lines))
    >>> print(summary(run))  # doctest: +NORMALIZE_WHITESPACE
    run ...: 3 episodes, 8 samples per episode
    median episode 0.500 s (16 samples/s), 1.5 s in all
    <BLANKLINE>
    stage   median s   share
    env     0.200      40.0 %
    train   0.300      60.0 %
    <BLANKLINE>
    metric   first   last   min   max
    reward   0.1     0.3    0.1   0.3
"""

from __future__ import annotations

import statistics
from pathlib import Path

from flowgraph.compiler.plan import COMMUNICATION, Instruction, format_table
from flowgraph.errors import FlowgraphError
from flowgraph.plot import read_metrics
from flowgraph.runtime.timeline import read_slices

# Drawn grey: slices that move data (weights, batches, offloaded state), not a model's compute.
MOVING_DATA = {*COMMUNICATION, "SYNC", "LOAD", "FREE"}


def _number(value: float) -> str:
    return f"{value:.4g}"


def summary(run_dir: str | Path) -> str:
    """The text ``flowc report`` prints."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FlowgraphError(
            f"{path} not found: flowc report reads the metrics.jsonl that a run writes into "
            "runtime.log_dir; pass that directory"
        )
    records = read_metrics(path)
    episodes = [r for r in records if r["episode"] > 0]
    if not episodes:
        raise FlowgraphError(f"{path} has no finished episode yet")
    seconds = [r["seconds"] for r in episodes]
    median = statistics.median(seconds)
    samples = statistics.median(r["samples"] for r in episodes)
    lines = [
        f"run {run_dir}: {len(episodes)} episodes"
        + (" (+ eval before training)" if len(records) > len(episodes) else "")
        + f", {samples:.0f} samples per episode",
        f"median episode {median:.3f} s ({samples / median:.0f} samples/s), "
        f"{sum(seconds):.1f} s in all",
        "",
    ]
    phases = ["env", "train", "sync", "eval", "checkpoint"]

    def order(stage: str) -> tuple:
        phase = stage.split("/")[0]
        return (phases.index(phase) if phase in phases else len(phases), phase, "/" in stage, stage)

    stages = sorted({k for r in episodes for k in r["stages"]}, key=order)
    rows = [["stage", "median s", "share"]]
    for stage in stages:
        value = statistics.median(r["stages"].get(stage, 0.0) for r in episodes)
        name = f"  {stage}" if "/" in stage else stage
        rows.append([name, f"{value:.3f}", f"{100 * value / median:.1f} %"])
    lines += [format_table(rows, gap="   "), ""]
    rows = [["metric", "first", "last", "min", "max"]]
    for key in sorted({k for r in records for k in r["metrics"]}):
        values = [r["metrics"][key] for r in records if key in r["metrics"]]
        rows.append([key, *map(_number, (values[0], values[-1], min(values), max(values)))])
    lines.append(format_table(rows, gap="   "))
    return "\n".join(lines)


def draw_timeline(trace: str | Path, png: str | Path) -> Path:
    """One row per rank, one bar per slice of ``trace`` (seconds from the first slice),
    coloured by model; communication in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    slices = read_slices(trace)
    if not slices:
        raise FlowgraphError(f"{trace} holds no slices")
    start = min(s["ts"] for s in slices)
    ranks = sorted({s["pid"] for s in slices})
    models = sorted({_model(s) for s in slices if s["cat"] not in MOVING_DATA})
    palette = plt.get_cmap("tab10")
    colors = {m: palette(i % 10) for i, m in enumerate(models)}
    fig, ax = plt.subplots(figsize=(12, max(2.4, 1.0 + 0.5 * len(ranks))))
    for s in slices:
        color = "#999999" if s["cat"] in MOVING_DATA else colors[_model(s)]
        ax.barh(ranks.index(s["pid"]), s["dur"] / 1e6, left=(s["ts"] - start) / 1e6,
                color=color, edgecolor="black", linewidth=0.1)  # fmt: skip
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title("measured timeline")
    handles = [Patch(color=c, label=m) for m, c in colors.items()]
    handles.append(Patch(color="#999999", label="communication"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)


def _model(piece: dict) -> str:
    """``policy`` of the slice ``RUN policy.forward_step[mb0]`` or ``TRAIN policy[step0]``
    (slice names are instruction texts)."""
    return Instruction.parse(piece["name"], piece["args"].get("phase", "")).model


def write_pictures(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """``metrics.png`` and, when the run was traced, ``timeline.png`` in ``out_dir``
    (default: the run directory)."""
    from flowgraph.plot import plot_metrics

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir
    written = [plot_metrics(run_dir / "metrics.jsonl", out / "metrics.png")]
    if (run_dir / "trace.json").is_file():
        written.append(draw_timeline(run_dir / "trace.json", out / "timeline.png"))
    return written

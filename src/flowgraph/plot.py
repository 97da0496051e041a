"""Curves of a run's metrics (``metrics.jsonl``) drawn to a PNG with matplotlib.

Example::

    plot_metrics("runs/ppo/metrics.jsonl", "runs/ppo/metrics.png")

draws one panel per group of metrics: rewards and eval scores, KL, losses.
"""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (("reward", ("reward", "score")), ("KL", ("kl",)), ("loss", ("loss",)))


RECORD_KEYS = {
    "episode": int,
    "samples": int,
    "seconds": (int, float),
    "stages": dict,
    "metrics": dict,
}


def read_metrics(path: str | Path) -> list[dict]:
    """The episode records of a ``metrics.jsonl`` file, in order. A last line without its
    newline is one a running job is writing: left out. A line that is not an episode
    record is an error naming the file and line."""
    from flowgraph.data import schema_problem
    from flowgraph.errors import DataError

    text = Path(path).read_text()
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]  # still being written
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or schema_problem(record, RECORD_KEYS):
            raise DataError(
                f"{path}:{number} is not an episode record of flowgraph (JSON with "
                f"{', '.join(RECORD_KEYS)}): {line[:60]!r}; point flowc report at a run's "
                "runtime.log_dir"
            )
        records.append(record)
    return records


def panels(records: list[dict]) -> list[tuple[str, list[str]]]:
    """``(title, metric names)`` of every panel with at least one metric to draw."""
    names = sorted({k for r in records for k in r.get("metrics", {})})
    found = []
    for title, words in PANELS:
        keys = [n for n in names if any(w in n.rsplit("/", 1)[-1] for w in words)]
        keys = [k for k in keys if not k.endswith("approx_kl")]
        if keys:
            found.append((title, keys))
    return found


def plot_metrics(jsonl: str | Path, png: str | Path) -> Path:
    """Draw the reward, KL and loss curves of ``jsonl`` over episodes into ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(jsonl)
    chosen = panels(records) or [("metrics", [])]
    fig, axes = plt.subplots(len(chosen), 1, figsize=(7, 2.6 * len(chosen)), squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], chosen, strict=True):
        for key in keys:
            points = [(r["episode"], r["metrics"][key]) for r in records if key in r["metrics"]]
            ax.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None,
                    label=key)  # fmt: skip
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("episode")
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)

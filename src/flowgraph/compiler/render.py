"""Pictures of a plan: the dataflow graph as Graphviz DOT, the schedule as a Gantt chart.

Example::

    print(to_dot(engine.graphs(), plan))    # flowc compile ... --dot
    draw_gantt(plan, "schedule.png")        # flowc compile ... --png schedule.png
"""

from __future__ import annotations

from collections.abc import Mapping

from flowgraph.compiler.cluster import format_ranks
from flowgraph.compiler.graph import TRAIN_METHOD, Graph
from flowgraph.compiler.plan import Plan
from flowgraph.errors import PlanError

PALETTE = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
)  # fmt: skip
COMMUNICATION_COLOR = "#cccccc"


def _colors(plan: Plan) -> dict[str, str]:
    models = [p.model for p in plan.placement]
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(models)}


def to_dot(graphs: Mapping[str, Graph], plan: Plan) -> str:
    """A Graphviz digraph: one cluster per flow, nodes coloured by model and labelled with
    their ranks, dashed edges for parameter syncs."""
    colors = _colors(plan)
    ranks = {p.model: format_ranks(p.ranks) for p in plan.placement}
    lines = ["digraph flowgraph {", "  rankdir=LR;", '  node [shape=box, style="rounded,filled"];']
    first_node: dict[str, str] = {}
    for role, graph in graphs.items():
        lines.append(f'  subgraph "cluster_{role}" {{')
        lines.append(f'    label="{role}: {graph.name}";')
        for node in graph:
            ident = f"{role}.{node.name}"
            if node.op == "call_model":
                first_node.setdefault(node.model, ident)
                label = f"{node.target}\\n{ranks.get(node.model, '?')}\\n{node.source}"
                color = colors.get(node.model, "#ffffff")
                lines.append(f'    "{ident}" [label="{label}", fillcolor="{color}"];')
            else:
                lines.append(
                    f'    "{ident}" [label="{node.op}", shape=ellipse, fillcolor="#ffffff"];'
                )
        for node in graph:
            for producer in node.inputs:
                lines.append(f'    "{role}.{producer}" -> "{role}.{node.name}";')
        lines.append("  }")
    trainers = {n.model: f"trainer.{n.name}" for n in graphs.get("trainer", Graph("-")).calls()
                if n.method == TRAIN_METHOD}  # fmt: skip
    for stream in plan.streams:
        for ins in stream.instructions:
            if ins.op in ("SYNC", "BCAST") and (ins.op == "SYNC" or ins.bucket == 0):
                src, dst = ins.src, ins.dst
                if src in trainers and dst in first_node:
                    edge = (
                        f'  "{trainers[src]}" -> "{first_node[dst]}" [style=dashed, label="sync"];'
                    )
                    if edge not in lines:
                        lines.append(edge)
    lines.append("}")
    return "\n".join(lines)


def draw_gantt(plan: Plan, path: str) -> None:
    """Draw the simulated schedule: one row per rank group, one bar per instruction,
    coloured by model (communication in grey). The format follows the file extension."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise PlanError(
            "drawing needs matplotlib: pip install 'flowgraph[plot]' (or matplotlib)"
        ) from None
    colors = _colors(plan)
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.6 * len(plan.streams)))
    for row, (stream, times) in enumerate(zip(plan.streams, plan.times, strict=True)):
        for ins, (start, end) in zip(stream.instructions, times, strict=True):
            if end <= start:
                continue
            color = COMMUNICATION_COLOR if ins.is_communication else colors.get(ins.model, "#888")
            ax.barh(row, end - start, left=start, color=color, edgecolor="black", linewidth=0.2)
    ax.set_yticks(range(len(plan.streams)), [s.name for s in plan.streams])
    ax.invert_yaxis()
    ax.set_xlabel("estimated seconds")
    title = f"flowgraph schedule on {plan.cluster.world_size} devices"
    if plan.max_staleness:
        k = plan.max_staleness
        title += f" (max_staleness={k}: one iteration, train e | env e+{k})"
    ax.set_title(title)
    handles = [Patch(color=c, label=m) for m, c in colors.items()]
    handles.append(Patch(color=COMMUNICATION_COLOR, label="communication"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

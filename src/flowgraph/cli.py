"""``flowc``: look at a flowgraph script before launching it, and at a run after it.

flowc trace examples/rlhf_toy.py                          # the traced graphs
flowc compile examples/rlhf_toy.py --world-size 8         # placement, schedule, estimates
flowc compile train.py --nodes 4 --gpus-per-node 8 --config train.yaml runtime.seed=3
flowc compile train.py --world-size 8 --json > plan.json  # the plan as JSON
flowc compile train.py --world-size 8 --dot | dot -Tsvg > graph.svg
flowc compile train.py --world-size 8 --png gantt.png     # Gantt chart of the schedule
flowc profile examples/grpo.py --out grpo.json            # measure costs on this machine
flowc compile examples/grpo.py --cpu --world-size 2 --profile grpo.json
flowc report runs/ppo                                     # summary, curves, timeline of a run
flowc export runs/grpo/ckpt --model grpo_policy --out hf/grpo  # a model in Hugging Face format
"""

from __future__ import annotations

import argparse
import sys

from flowgraph.compiler.cluster import ClusterSpec
from flowgraph.config import load_config
from flowgraph.errors import FlowgraphError
from flowgraph.loader import load_engine, load_script

TARGET_HELP = (
    'the training script; it is imported with its `if __name__ == "__main__":` block '
    "skipped. OBJECT names the Engine (or a function returning one) when the script builds "
    "several"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowc",
        description="Inspect flowgraph scripts without running them: the traced graphs, "
        "where every model lives, the per-rank schedule and its estimated cost.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    trace = commands.add_parser(
        "trace",
        help="print the traced dataflow graphs of a script's Engine",
        description="Trace the env, trainer and eval flows of the Engine that FILE builds "
        "and print their graphs, one line per model call with its source line.",
    )
    trace.add_argument("target", metavar="FILE[:OBJECT]", help=TARGET_HELP)
    trace.set_defaults(run=_trace)

    compile_ = commands.add_parser(
        "compile",
        help="compile the plan for a cluster and print it",
        description="Compile the plan of the Engine that FILE builds for a cluster and print "
        "the traced graphs, a placement table (model -> ranks, memory per device against the "
        "budget), the Step x Rank schedule grid (ranks with identical streams share a column) "
        "and the estimated episode time. Nothing is launched; no GPU is needed.",
    )
    compile_.add_argument("target", metavar="FILE[:OBJECT]", help=TARGET_HELP)
    size = compile_.add_mutually_exclusive_group(required=True)
    size.add_argument(
        "--world-size", type=int, metavar="N", help="N devices (8 per node when N > 8)"
    )
    size.add_argument("--nodes", type=int, metavar="N", help="N nodes (with --gpus-per-node)")
    compile_.add_argument("--gpus-per-node", type=int, metavar="G", help="devices per node")
    compile_.add_argument(
        "--cpu",
        action="store_true",
        help="CPU processes with gloo instead of GPUs (memory, speed, links)",
    )
    compile_.add_argument(
        "--device-memory",
        type=float,
        metavar="GIB",
        help="memory per device in GiB (default 80 for GPUs)",
    )
    compile_.add_argument("--config", metavar="YAML", help="config file, as flowgraph.init takes")
    compile_.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. runtime.sample_per_episode=512",
    )
    compile_.add_argument(
        "--profile",
        metavar="PROFILE.json",
        help="estimate with the costs flowc profile measured (same as runtime.profile=FILE)",
    )
    out = compile_.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the plan as JSON only")
    out.add_argument("--dot", action="store_true", help="print the dataflow graph as Graphviz DOT")
    out.add_argument("--svg", metavar="FILE", help="draw the schedule as a Gantt chart (SVG)")
    out.add_argument("--png", metavar="FILE", help="draw the schedule as a Gantt chart (PNG)")
    compile_.set_defaults(run=_compile)

    profile = commands.add_parser(
        "profile",
        help="measure a script's costs on this machine for flowc compile --profile",
        description="Run the Engine that FILE builds for a few traced episodes, twice (the "
        "configured batch sizes, then halved), in one process or under torchrun with "
        "--nproc-per-node N, and write what the cost model needs to PROFILE.json: seconds per "
        "call of every model's method by batch size and tokens, per optimizer step of every "
        "trainer, the links between ranks, the framework's time per episode. Then "
        "flowc compile FILE --profile PROFILE.json (or runtime.profile) estimates with it.",
    )
    profile.add_argument("target", metavar="FILE[:OBJECT]", help=TARGET_HELP)
    profile.add_argument("--out", required=True, metavar="PROFILE.json", help="file to write")
    profile.add_argument("--config", metavar="YAML", help="config file, as flowgraph.init takes")
    profile.add_argument(
        "--nproc-per-node", type=int, default=1, metavar="N",
        help="profile under torchrun with N processes (default 1: this process's kind)",
    )  # fmt: skip
    profile.add_argument(
        "--episodes", type=int, default=5, metavar="E",
        help="episodes per run (default 5; the first warms up and is not measured)",
    )  # fmt: skip
    profile.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    profile.set_defaults(run=_profile)

    report = commands.add_parser(
        "report",
        help="summarise a run from its log directory and draw its curves and timeline",
        description="Print a run's episodes, throughput, median time per stage and the "
        "first/last/min/max of every metric from RUN_DIR/metrics.jsonl; draw metrics.png "
        "(reward, KL, loss curves) and, when the run had runtime.trace: true, timeline.png "
        "(one row per rank, one bar per executed instruction, from RUN_DIR/trace.json).",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="the run's runtime.log_dir")
    report.add_argument("--out", metavar="DIR", help="where to draw the PNGs (default RUN_DIR)")
    report.add_argument("--no-plots", action="store_true", help="print the summary only")
    report.set_defaults(run=_report)

    export = commands.add_parser(
        "export",
        help="write a trained model of a checkpoint in Hugging Face format",
        description="Write model NAME of a checkpoint into DIR so that transformers' "
        "AutoModelForCausalLM.from_pretrained(DIR) and AutoTokenizer.from_pretrained(DIR) "
        "load it: config.json, model.safetensors and the tokenizer files. A TinyGPT becomes "
        "the equivalent GPT2LMHeadModel (the same logits), a Hugging Face policy is saved as "
        "itself, a DeepSpeed ZeRO trainer's shards are gathered (docs/export.md).",
    )
    export.add_argument(
        "source",
        metavar="CHECKPOINT_OR_RUN_DIR",
        help="one episode_* checkpoint, or a run's runtime.checkpoint_dir (its newest "
        "complete checkpoint)",
    )
    export.add_argument(
        "--model", required=True, metavar="NAME", help="the model, e.g. the trainer grpo_policy"
    )
    export.add_argument("--out", required=True, metavar="DIR", help="the directory to write")
    export.add_argument("--force", action="store_true", help="replace a non-empty --out")
    export.set_defaults(run=_export)
    return parser


def _profile(args: argparse.Namespace) -> int:
    from flowgraph.profiling import profile_script

    if args.nproc_per_node < 1:
        raise SystemExit(f"flowc profile: --nproc-per-node must be at least 1, got "
                         f"{args.nproc_per_node}")  # fmt: skip
    profile = profile_script(args.target, args.config, args.overrides, args.out,
                             nproc=args.nproc_per_node, episodes=args.episodes)  # fmt: skip
    measured = profile.measured
    estimate, median = measured["estimate_s"], measured["median_s"]
    print(
        f"wrote {args.out}: {len(profile.calls)} calls, {len(profile.train)} trainers, "
        f"{len(profile.links)} links, measured on {profile.devices()}"
    )
    print(f"measured {median:.3f} s per episode (median of {len(measured['episodes_s'])}; "
          f"layout {measured['layout']}); the profile's estimate of that run {estimate:.3f} s "
          f"({estimate / median:.2f}x)")  # fmt: skip
    print(
        f"use it: flowc compile {args.target} --profile {args.out} ... "
        f"(or runtime.profile={args.out})"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from flowgraph.export import export

    print(export(args.source, args.model, args.out, force=args.force))
    return 0


def _report(args: argparse.Namespace) -> int:
    from flowgraph.report import summary, write_pictures

    print(summary(args.run_dir))
    if not args.no_plots:
        for path in write_pictures(args.run_dir, args.out):
            print(f"wrote {path}")
    return 0


def _trace(args: argparse.Namespace) -> int:
    print(load_engine(args.target))
    return 0


def _cluster(args: argparse.Namespace) -> ClusterSpec:
    if args.nodes is not None:
        if args.gpus_per_node is None:
            raise SystemExit("flowc compile: --nodes needs --gpus-per-node")
        nodes, per_node = args.nodes, args.gpus_per_node
        if nodes < 1 or per_node < 1:
            raise SystemExit(
                f"flowc compile: --nodes and --gpus-per-node must be at least 1, got "
                f"{nodes} and {per_node}"
            )
    else:
        world = args.world_size
        if world < 1:
            raise SystemExit(f"flowc compile: --world-size must be at least 1, got {world}")
        per_node = args.gpus_per_node if args.gpus_per_node is not None else min(world, 8)
        if per_node < 1:
            raise SystemExit(f"flowc compile: --gpus-per-node must be at least 1, got {per_node}")
        if world % per_node:
            raise SystemExit(f"flowc compile: --world-size {world} is not a multiple of {per_node}")
        nodes = world // per_node
    if args.cpu:
        cluster = ClusterSpec.cpu(nodes * per_node, nodes=nodes)
    else:
        cluster = ClusterSpec(nodes=nodes, devices_per_node=per_node)
    if args.device_memory:
        cluster = ClusterSpec(**{**vars(cluster), "device_memory_gib": args.device_memory})
    return cluster


def _compile(args: argparse.Namespace) -> int:
    overrides = [*args.overrides, *([f"runtime.profile={args.profile}"] if args.profile else [])]
    engine, chosen = load_script(args.target, args.config, args.overrides)
    config = load_config(chosen.config, overrides)
    plan = engine.compile(_cluster(args), config)
    if not (args.json or args.dot):  # those print only the plan (they are piped on)
        print(chosen)
    if args.json:
        print(plan.to_json())
    elif args.dot:
        from flowgraph.compiler.render import to_dot

        print(to_dot(engine.graphs(), plan))
    elif args.svg or args.png:
        from flowgraph.compiler.render import draw_gantt

        path = args.svg or args.png
        draw_gantt(plan, path)
        print(f"wrote {path}")
    else:
        print(f"{engine}\n\n{plan}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow options (argparse stops positionals at the first one).
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown or (extra and args.command not in ("compile", "profile")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.run(args)
    except FlowgraphError as err:
        print(f"flowc: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    except SystemExit as err:  # the argument checks above: one line, exit code 2
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())

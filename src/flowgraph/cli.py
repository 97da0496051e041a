"""``flowc``: look at a flowgraph script before launching it.

flowc trace examples/rlhf_toy.py          # the traced graphs of its Engine
flowc trace train.py:engine               # pick one Engine of several
"""

from __future__ import annotations

import argparse
import sys

from flowgraph.errors import FlowgraphError
from flowgraph.loader import load_engine


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowc",
        description="Inspect flowgraph scripts without running them: the script is "
        'imported with its `if __name__ == "__main__":` block skipped.',
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    trace = commands.add_parser(
        "trace",
        help="print the traced dataflow graphs of a script's Engine",
        description="Trace the env, trainer and eval flows of the Engine that FILE builds "
        "and print their graphs, one line per model call with its source line.",
    )
    trace.add_argument(
        "target",
        metavar="FILE[:OBJECT]",
        help="the training script; OBJECT names the Engine (or a function returning one) "
        "when the script builds several",
    )
    trace.set_defaults(run=_trace)
    return parser


def _trace(args: argparse.Namespace) -> int:
    engine = load_engine(args.target)
    print(engine)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except FlowgraphError as err:
        print(f"flowc: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

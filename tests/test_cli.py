"""flowc trace: imports a script without running learn(), prints its graphs."""

import subprocess
import sys
import textwrap
from pathlib import Path

from flowgraph.cli import main

EXAMPLE = Path(__file__).parent.parent / "examples" / "rlhf_toy.py"

SCRIPT_HEAD = """
from flowgraph import BaseModule, Engine, Environment

class Echo(BaseModule):
    def forward_step(self, data):
        return data

echo = Echo("echo")
def flow(batch):
    return echo.forward_step(batch)
"""


def write(tmp_path, body):
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(SCRIPT_HEAD) + textwrap.dedent(body))
    return str(path)


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_trace_the_demo_golden(capsys, golden):
    code, out, _ = run(["trace", str(EXAMPLE)], capsys)
    assert code == 0
    golden("flowc_trace_rlhf_toy.txt", out.rstrip())


def test_main_guard_is_respected(tmp_path, capsys):
    target = write(
        tmp_path,
        """
        engine = Engine(Environment(flow))
        if __name__ == "__main__":
            raise SystemExit("learn() must not run under flowc")
    """,
    )
    code, out, _ = run(["trace", target], capsys)
    assert code == 0 and "%batch_1" not in out and "call_model[echo.forward_step]" in out


def test_object_selects_one_of_several_engines_or_a_function(tmp_path, capsys):
    target = write(
        tmp_path,
        """
        first = Engine(Environment(flow))
        second = Engine(Environment(flow))
        def build():
            return Engine(Environment(flow))
    """,
    )
    code, _, err = run(["trace", target], capsys)
    assert code == 1 and "defines several Engines (first, second); pick one" in err
    assert run(["trace", f"{target}:second"], capsys)[0] == 0
    assert run(["trace", f"{target}:build"], capsys)[0] == 0
    code, _, err = run(["trace", f"{target}:third"], capsys)
    assert code == 1 and "defines no 'third'; Engines in it: first, second" in err


def test_script_without_an_engine(tmp_path, capsys):
    target = write(
        tmp_path,
        """
        if __name__ == "__main__":
            Engine(Environment(flow)).learn()
    """,
    )
    code, _, err = run(["trace", target], capsys)
    assert code == 1 and "builds no Engine at module level" in err and ":build_engine" in err


def test_trace_error_in_the_script_names_its_line(tmp_path, capsys):
    target = write(
        tmp_path,
        """
        def bad_flow(batch):
            out = echo.forward_step(batch)
            if out:
                return out
        engine = Engine(Environment(bad_flow))
    """,
    )
    code, _, err = run(["trace", target], capsys)
    assert code == 1
    assert "ControlFlowError" in err and "train.py:14" in err and "if out:" in err


def test_missing_file(capsys):
    code, _, err = run(["trace", "nope.py"], capsys)
    assert code == 1 and "nope.py: no such file" in err


def test_console_script_help():
    flowc = Path(sys.executable).parent / "flowc"  # installed beside the venv's python
    assert flowc.exists(), "the flowc console script is not installed; run make install"
    result = subprocess.run(
        [str(flowc), "trace", "--help"], capture_output=True, text=True, check=True
    )
    assert "FILE[:OBJECT]" in result.stdout and "OBJECT names the Engine" in result.stdout

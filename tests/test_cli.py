"""flowc trace: imports a script without running learn(), prints its graphs."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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
    assert code == 2 and "defines several Engines (first, second); pick one" in err
    assert run(["trace", f"{target}:second"], capsys)[0] == 0
    assert run(["trace", f"{target}:build"], capsys)[0] == 0
    code, _, err = run(["trace", f"{target}:third"], capsys)
    assert code == 2 and "defines no 'third'; Engines in it: first, second" in err


def test_script_without_an_engine(tmp_path, capsys):
    target = write(
        tmp_path,
        """
        if __name__ == "__main__":
            Engine(Environment(flow)).learn()
    """,
    )
    code, _, err = run(["trace", target], capsys)
    assert code == 2 and "builds no Engine at module level" in err and ":build_engine" in err


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
    assert code == 2
    assert "ControlFlowError" in err and "train.py:14" in err and "if out:" in err


def test_missing_file(capsys):
    code, _, err = run(["trace", "nope.py"], capsys)
    assert code == 2 and "nope.py: no such file" in err


def test_console_script_help():
    flowc = Path(sys.executable).parent / "flowc"  # installed beside the venv's python
    assert flowc.exists(), "the flowc console script is not installed; run make install"
    result = subprocess.run(
        [str(flowc), "trace", "--help"], capture_output=True, text=True, check=True
    )
    assert "FILE[:OBJECT]" in result.stdout and "OBJECT names the Engine" in result.stdout


CONFIG_8 = str(Path(__file__).parent / "configs" / "rlhf_8gpu.yaml")


def test_compile_the_demo_on_8_gpus_golden(capsys, golden):
    code, out, err = run(["compile", str(EXAMPLE), "--world-size", "8", "--config", CONFIG_8],
                         capsys)  # fmt: skip
    assert code == 0, err
    golden("flowc_compile_rlhf_8gpu.txt", out.rstrip())


def test_compile_json_is_the_plan(capsys):
    from flowgraph.compiler.plan import Plan

    code, out, _ = run(["compile", str(EXAMPLE), "--nodes", "2", "--gpus-per-node", "4",
                        "--config", CONFIG_8, "--json"], capsys)  # fmt: skip
    assert code == 0
    plan = Plan.from_json(out)
    assert plan.cluster.nodes == 2 and plan.to_json() == out.strip()


def test_compile_overrides_after_options(capsys):
    code, out, _ = run(["compile", str(EXAMPLE), "--world-size", "8", "--config", CONFIG_8,
                        "models.ppo_policy.num_gpu=4", "models.ppo_value.num_gpu=4",
                        "models.policy.num_gpu=4", "models.reference.num_gpu=4",
                        "models.value.num_gpu=4", "models.reward.num_gpu=4",
                        "runtime.colocation=[[policy,reference,value,reward],[ppo_policy,ppo_value]]"],
                       capsys)  # fmt: skip
    assert code == 0
    assert "ppo_policy  r4-r7  trainer" in out


def test_compile_dot(capsys):
    code, out, _ = run(["compile", str(EXAMPLE), "--world-size", "8", "--config", CONFIG_8,
                        "--dot"], capsys)  # fmt: skip
    assert code == 0 and out.startswith("digraph flowgraph {") and out.rstrip().endswith("}")
    assert '[style=dashed, label="sync"]' in out and "policy.forward_step" in out


@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_compile_draws_the_gantt_chart(tmp_path, capsys, fmt):
    path = tmp_path / f"schedule.{fmt}"
    code, out, _ = run(["compile", str(EXAMPLE), "--world-size", "8", "--config", CONFIG_8,
                        f"--{fmt}", str(path)], capsys)  # fmt: skip
    assert code == 0 and f"wrote {path}" in out
    data = path.read_bytes()
    assert len(data) > 5000
    assert data.startswith(b"\x89PNG") if fmt == "png" else b"<svg" in data[:1000]


def test_compile_infeasible_request_exit_code_and_message(capsys):
    code, _, err = run(["compile", str(EXAMPLE), "--world-size", "8", "--config", CONFIG_8,
                        "models.policy.num_gpu=16", "models.reference.num_gpu=1",
                        "models.value.num_gpu=1", "models.reward.num_gpu=1",
                        "models.ppo_policy.num_gpu=1", "models.ppo_value.num_gpu=1"],
                       capsys)  # fmt: skip
    assert code == 2
    assert "PlanError: [place_models] the models need 21 devices" in err


def test_compile_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["compile", str(EXAMPLE)])  # no cluster size
    assert "one of the arguments --world-size --nodes is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compile", str(EXAMPLE), "--world-size", "8", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert main(["compile", str(EXAMPLE), "--world-size", "12"]) == 2
    assert "--world-size 12 is not a multiple of 8" in capsys.readouterr().err


def test_compile_split_placement_golden(capsys, golden):
    """Split meshes: transfers between groups, pipelined waves, broadcast weight sync."""
    split = ["runtime.colocation=[[policy,reference],[ppo_policy,ppo_value]]",
             "models.policy.num_gpu=2", "models.reference.num_gpu=2", "models.value.num_gpu=1",
             "models.reward.num_gpu=1", "models.ppo_policy.num_gpu=4",
             "models.ppo_value.num_gpu=4"]  # fmt: skip
    code, out, err = run(["compile", str(EXAMPLE), "--world-size", "8", "--config", CONFIG_8,
                          *split], capsys)  # fmt: skip
    assert code == 0, err
    golden("flowc_compile_rlhf_8gpu_split.txt", out.rstrip())

"""flowc plans with the config the script's own run loads (and says which)."""

import re
import textwrap
from pathlib import Path

import yaml

from flowgraph.cli import main
from flowgraph.loader import load_script
from flowgraph.script_config import find_default_config

ROOT = Path(__file__).parent.parent


def test_the_example_plans_with_the_yaml_its_main_passes_to_init_from_argv(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # paths below the working directory are shown relative to it
    engine, chosen = load_script(str(ROOT / "examples" / "ppo.py"))
    assert Path(chosen.config) == ROOT / "examples" / "ppo.yaml"
    assert "the default" in chosen.origin and "init_from_argv, line" in chosen.origin
    assert main(["compile", str(ROOT / "examples" / "ppo.py"), "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("config: examples/ppo.yaml (the default")
    samples = yaml.safe_load((ROOT / "examples" / "ppo.yaml").read_text())["runtime"][
        "sample_per_episode"
    ]
    assert samples != 16  # the defaults would plan 16 samples
    runtime = yaml.safe_load((ROOT / "examples" / "ppo.yaml").read_text())["runtime"]
    steps = runtime["num_training_epoch"] * samples // runtime["train_global_batch_size"]
    assert steps != 1  # the defaults plan 1 optimizer step per episode
    found = re.search(r"waves per episode: env \d+, train steps (\d+)", out).group(1)
    assert int(found) == steps, out


def test_config_and_overrides_given_to_flowc_win(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    script = str(ROOT / "examples" / "ppo.py")
    code = main(
        [
            "compile",
            script,
            "--world-size",
            "1",
            "--config",
            str(ROOT / "examples" / "rlhf_toy.yaml"),
            "runtime.seed=3",
        ]
    )
    assert code == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "config: examples/rlhf_toy.yaml (--config, with runtime.seed=3)"


def scan(body: str, namespace=None):
    return find_default_config(textwrap.dedent(body), "train.py", namespace or {})


def test_flowgraph_init_and_its_keyword_forms_are_found():
    assert scan('import flowgraph\nflowgraph.init("a.yaml", [])').config == "a.yaml"
    assert scan('init_from_argv(sys.argv[1:], default_config="b.yaml")').config == "b.yaml"
    from flowgraph import init

    found = scan('def main():\n    init(config="c.yaml")\n', {"init": init})
    assert found.config == "c.yaml" and "line 2" in found.origin


def test_a_script_without_an_init_call_plans_with_the_defaults_and_says_so():
    found = scan("x = 1\n")
    assert found.config is None
    assert str(found) == (
        "config: defaults (train.py calls neither init_from_argv nor "
        "flowgraph.init; pass --config FILE)"
    )


def test_a_function_of_the_script_called_init_is_not_flowgraphs():
    found = scan('def init(x):\n    pass\ninit("not-a-config.yaml")\n', {"init": lambda x: x})
    assert found.config is None


def test_an_expression_flowc_cannot_evaluate_is_named():
    found = scan("def main(path):\n    init_from_argv([], path)\n")
    assert found.config is None
    assert "train.py:2 passes path to init_from_argv, which flowc cannot evaluate" in found.origin
    assert "pass --config FILE" in found.origin


def test_the_expression_is_evaluated_in_the_scripts_namespace(tmp_path, capsys):
    (tmp_path / "mine.yaml").write_text(
        "runtime:\n  sample_per_episode: 48\n  generation_batch_size: 8\n"
    )
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent("""
        import os, sys
        from flowgraph import BaseModule, Engine, Environment
        from flowgraph.config import init_from_argv

        class Echo(BaseModule):
            def forward_step(self, data):
                return data

        echo = Echo("echo")
        def flow(batch):
            return echo.forward_step(batch)
        engine = Engine(Environment(flow))
        HERE = os.path.dirname(__file__)

        if __name__ == "__main__":
            init_from_argv(sys.argv[1:], os.path.join(HERE, "mine.yaml"))
            engine.learn()
    """)
    )
    assert main(["compile", str(script), "--world-size", "1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        f"config: {tmp_path / 'mine.yaml'} (the default {script} passes to init_from_argv, line 17)"
    )
    assert "waves per episode: env 6" in out  # 48 / 8 micro-batches: mine.yaml, not defaults

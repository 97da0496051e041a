"""Which config a script's own run loads by default, found without running its ``main``.

``flowc compile train.py`` must plan what ``python train.py`` runs. A script names its
default config in a call to ``init_from_argv(argv, DEFAULT)`` or ``flowgraph.init(CONFIG,
...)``, usually inside ``main()``, which ``flowc`` does not run. So the script's source is
searched for the first such call and its config argument is evaluated in the script's
module namespace (``os.path.join(os.path.dirname(__file__), "ppo.yaml")`` evaluates there
as it would in ``main``). Nothing else of the script runs.

Example::

    >>> import os
    >>> source = 'def main(argv):\\n    init_from_argv(argv, "ppo.yaml")\\n'
    >>> print(find_default_config(source, "train.py", {}))
    config: ppo.yaml (the default train.py passes to init_from_argv, line 2)
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# call name -> (position, keyword) of its config argument
CONFIG_ARGUMENT = {"init_from_argv": (1, "default_config"), "init": (0, "config")}


@dataclass(frozen=True)
class ScriptConfig:
    """The config a plan is compiled with and where it came from (printed by flowc)."""

    config: str | Path | Mapping[str, Any] | None  # what load_config takes; None: defaults
    origin: str

    def __str__(self) -> str:
        if self.config is None:
            return f"config: defaults ({self.origin})"
        shown = _shown(self.config) if isinstance(self.config, (str, Path)) else "a mapping"
        return f"config: {shown} ({self.origin})"


def _shown(path: str | Path) -> str:
    """``path`` relative to the working directory when it lies below it (shorter)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def given_config(path: str | None, overrides: list[str]) -> ScriptConfig | None:
    """The config named on flowc's command line (``--config``), or ``None``."""
    if path is None:
        return None
    return ScriptConfig(path, "--config" + _overrides(overrides))


def find_default_config(
    source: str, script: str | Path, namespace: Mapping[str, Any], overrides: list[str] = ()
) -> ScriptConfig:
    """The config the script's first ``init_from_argv``/``flowgraph.init`` call loads."""
    extra = _overrides(list(overrides))
    for call, name in _config_calls(source):
        if (
            name == "init"
            and isinstance(call.func, ast.Name)
            and not _is_flowgraph_init(namespace.get("init"))
        ):
            continue  # the script's own function called init
        expr = _config_expression(call, name)
        if expr is None:  # init() with no config: the defaults
            return ScriptConfig(None, f"{script} calls {name}() without one, line "
                                      f"{call.lineno}{extra}")  # fmt: skip
        try:
            value = eval(compile(ast.Expression(expr), str(script), "eval"), dict(namespace))
        except Exception as err:
            return ScriptConfig(
                None,
                f"{script}:{call.lineno} passes {ast.unparse(expr)} to {name}, which flowc "
                f"cannot evaluate outside the call ({type(err).__name__}: {err}); pass "
                f"--config FILE{extra}",
            )
        if value is not None and not isinstance(value, (str, Path, Mapping)):
            value = value if hasattr(value, "runtime") else None  # a Config object
        return ScriptConfig(
            value, f"the default {script} passes to {name}, line {call.lineno}{extra}"
        )
    return ScriptConfig(
        None, f"{script} calls neither init_from_argv nor flowgraph.init; pass --config FILE{extra}"
    )


def _config_calls(source: str) -> list[tuple[ast.Call, str]]:
    """``init_from_argv(...)`` and ``[flowgraph.]init(...)`` calls, in source order."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in CONFIG_ARGUMENT:
            found.append((node, func.id))
        elif isinstance(func, ast.Attribute) and func.attr in CONFIG_ARGUMENT:
            owner = func.value
            if func.attr == "init_from_argv" or (
                isinstance(owner, ast.Name) and owner.id in ("flowgraph", "fg", "config")
            ):
                found.append((node, func.attr))
    return sorted(found, key=lambda pair: (pair[0].lineno, pair[0].col_offset))


def _is_flowgraph_init(value: Any) -> bool:
    from flowgraph.config import init

    return value is init


def _config_expression(call: ast.Call, name: str) -> ast.expr | None:
    position, keyword = CONFIG_ARGUMENT[name]
    for kw in call.keywords:
        if kw.arg == keyword:
            return kw.value
    return call.args[position] if len(call.args) > position else None


def _overrides(overrides: list[str]) -> str:
    return f", with {' '.join(overrides)}" if overrides else ""

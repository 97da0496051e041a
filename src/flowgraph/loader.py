"""Find the Engine of a user's script without running its ``learn()``.

The script is executed as a module named ``__flowc__`` (not ``__main__``), so the code
under its ``if __name__ == "__main__":`` guard does not run. ``FILE:OBJECT`` names the
Engine (or a function returning one) when the script defines several.

Example::

    engine = load_engine("examples/rlhf_toy.py")           # the only Engine in it
    engine = load_engine("train.py:build_engine")          # a function returning one
"""

from __future__ import annotations

import os
import runpy
import sys
import traceback
from pathlib import Path
from typing import Any

from flowgraph import engine as engine_module
from flowgraph.engine import Engine
from flowgraph.errors import EngineError, FlowgraphError
from flowgraph.script_config import ScriptConfig, find_default_config, given_config


def split_target(target: str) -> tuple[Path, str | None]:
    """``"train.py:engine"`` -> ``(Path("train.py"), "engine")``."""
    path, sep, obj = target.rpartition(":")
    if not sep or not path or "/" in obj or obj.endswith(".py"):
        return Path(target), None
    return Path(path), obj


def load_engine(target: str) -> Engine:
    """The Engine that ``target`` (``FILE[:OBJECT]``) defines; ``EngineError`` if none or
    several match."""
    return load_script(target)[0]


def load_script(
    target: str, config: str | None = None, overrides: list[str] = ()
) -> tuple[Engine, ScriptConfig]:
    """The Engine of ``target`` and the config to plan it with: ``config`` (flowc's
    ``--config``) when given, else the one the script's own run loads by default."""
    path, name = split_target(target)
    if not path.is_file():
        raise EngineError(f"{path}: no such file; give the training script, e.g. train.py")
    namespace = _run_script(path)
    engine = _pick_engine(namespace, path, name)
    chosen = given_config(config, list(overrides)) or find_default_config(
        path.read_text(), path, namespace, list(overrides)
    )
    return engine, chosen


def _pick_engine(namespace: dict[str, Any], path: Path, name: str | None) -> Engine:
    if name is not None:
        if name not in namespace:
            found = ", ".join(_engines(namespace)) or "none"
            raise EngineError(f"{path} defines no {name!r}; Engines in it: {found}")
        return _as_engine(namespace[name], f"{path}:{name}")
    engines = _engines(namespace)
    if len(engines) == 1:
        return next(iter(engines.values()))
    if not engines:
        raise EngineError(
            f"{path} builds no Engine at module level (code under `if __name__ == "
            '"__main__":` is not run); build it at module level, or name a function that '
            f"returns one: {path}:build_engine"
        )
    raise EngineError(
        f"{path} defines several Engines ({', '.join(engines)}); pick one: {path}:NAME"
    )


def _run_script(path: Path) -> dict[str, Any]:
    """Execute the script as ``__flowc__`` with ``learn()`` disarmed: a script that trains
    when imported is stopped before it does, with the guard to add. Its own exceptions
    become one ``EngineError`` naming the script's line (flowgraph's errors stay)."""
    script_dir = str(path.resolve().parent)
    sys.path.insert(0, script_dir)  # scripts import their neighbours, as `python x.py` allows
    token = engine_module.IMPORTING.set(os.path.realpath(path))
    try:
        return runpy.run_path(str(path), run_name="__flowc__")
    except FlowgraphError:
        raise
    except SyntaxError as err:
        raise EngineError(
            f"{err.filename or path}:{err.lineno}: syntax error: {err.msg}; fix the script "
            "(python -m py_compile FILE shows the same)"
        ) from None
    except (Exception, SystemExit) as err:
        where = _script_line(err, path)
        raise EngineError(
            f"importing {path} raised {type(err).__name__}: {err} (at {where}); flowc runs "
            "the script's module level to find its Engine: fix that line, or move the code "
            'under `if __name__ == "__main__":`'
        ) from None
    finally:
        engine_module.IMPORTING.reset(token)
        if sys.path and sys.path[0] == script_dir:
            sys.path.pop(0)


def _script_line(err: BaseException, path: Path) -> str:
    """``train.py:12``: the script's last frame in ``err``'s traceback."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if Path(f.filename).resolve() == path.resolve()]  # fmt: skip
    return f"{path}:{frames[-1].lineno}" if frames else str(path)


def _engines(namespace: dict[str, Any]) -> dict[str, Engine]:
    return {k: v for k, v in namespace.items() if isinstance(v, Engine)}


def _as_engine(value: Any, where: str) -> Engine:
    if isinstance(value, Engine):
        return value
    if callable(value):
        built = value()
        if isinstance(built, Engine):
            return built
        raise EngineError(f"{where}() returned a {type(built).__name__}, not an Engine")
    raise EngineError(f"{where} is a {type(value).__name__}, not an Engine or a function")

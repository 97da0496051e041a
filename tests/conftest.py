import sys
from pathlib import Path

import pytest

from flowgraph.config import reset_config

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))


def pytest_addoption(parser):
    parser.addoption(
        "--accept-golden",
        action="store_true",
        help="rewrite the golden files under tests/golden/ with the current output",
    )


@pytest.fixture(autouse=True)
def _fresh_config():
    """Every test starts without a config set by flowgraph.init()."""
    reset_config()
    yield
    reset_config()


@pytest.fixture
def golden(request):
    """golden(name, text): compare text with tests/golden/<name>; --accept-golden rewrites."""

    def check(name: str, text: str) -> None:
        path = TESTS / "golden" / name
        if request.config.getoption("--accept-golden"):
            path.parent.mkdir(exist_ok=True)
            path.write_text(text + "\n")
            return
        assert path.exists(), f"no golden file {path}; run pytest --accept-golden once"
        assert text + "\n" == path.read_text(), (
            f"output differs from {path}; if the change is intended, rerun with --accept-golden"
        )

    return check

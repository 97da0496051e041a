"""The docs stay true: the config reference matches the config models."""

from pathlib import Path

from flowgraph.config import reference_markdown

ROOT = Path(__file__).parent.parent


def test_config_reference_is_current():
    text = (ROOT / "docs" / "config.md").read_text()
    assert text.endswith(reference_markdown()), "docs/config.md is stale: run make docs"

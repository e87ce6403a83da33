"""The README states what the code does: its settings table and quick start match the code."""

from __future__ import annotations

import re
from pathlib import Path

from deploy.envdoc import settings_markdown_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_settings_table_is_the_generated_one() -> None:
    block = re.search(r"<!-- settings:begin -->\n(.*?)<!-- settings:end -->", README, re.S)
    assert block, "README lacks the settings markers"
    assert block.group(1) == settings_markdown_table(), "regenerate: python -m tests.test_readme"


def test_quick_start_commands_are_make_targets_and_ci_runs_the_test_one() -> None:
    quick_start = README.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^make ([\w-]+)", quick_start, re.M)
    assert commands[:2] == ["up", "test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in commands:
        assert re.search(rf"^{target}:", makefile, re.M), f"make {target} is not a Makefile target"
    ci = (ROOT / ".ci" / "run").read_text()
    assert all(f"make {target}" in ci for target in commands if target.endswith("test")), "CI runs the tests"


if __name__ == "__main__":  # rewrite the README's settings table from core/settings.py
    text = re.sub(
        r"(<!-- settings:begin -->\n).*?(<!-- settings:end -->)",
        lambda m: m.group(1) + settings_markdown_table() + m.group(2),
        README,
        flags=re.S,
    )
    (ROOT / "README.md").write_text(text)

"""The documentation states what the code does: the site builds with --strict (no broken link or anchor),
its generated parts (settings, OpenAPI document) are current, and the README stays a short front door."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.envdoc import settings_markdown_table
from deploy.openapidoc import openapi_json

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CONFIGURATION = ROOT / "docs" / "configuration.md"
OPENAPI = ROOT / "docs" / "api" / "openapi.json"


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if mkdocs is None:
        pytest.fail("mkdocs is missing: make install (the dev extra brings mkdocs-material)")
    result = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "api" / "reference" / "index.html").exists()
    assert (tmp_path / "site" / "api" / "openapi.json").exists()


def test_the_settings_table_is_the_generated_one() -> None:
    block = re.search(r"<!-- settings:begin -->\n(.*?)<!-- settings:end -->", CONFIGURATION.read_text(), re.S)
    assert block, "docs/configuration.md lacks the settings markers"
    assert block.group(1) == settings_markdown_table(), "regenerate: python -m tests.test_docs"


def test_the_committed_openapi_document_is_what_the_routes_declare() -> None:
    assert OPENAPI.read_text() == openapi_json(), "regenerate: python -m tests.test_docs"


def test_the_readme_is_a_short_front_door() -> None:
    assert len(README.splitlines()) < 250
    for page in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (ROOT / page).exists(), f"the README links to {page}, which does not exist"
    assert "![" in README and "docs/screenshots/" in README


def test_quick_start_commands_are_make_targets_and_ci_runs_the_test_one() -> None:
    quick_start = README.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^make ([\w-]+)", quick_start, re.M)
    assert commands[:2] == ["up", "test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in [*commands, "docs"]:
        assert re.search(rf"^{target}:", makefile, re.M), f"make {target} is not a Makefile target"
    ci = (ROOT / ".ci" / "run").read_text()
    assert all(f"make {target}" in ci for target in commands if target.endswith("test")), "CI runs the tests"


if __name__ == "__main__":  # rewrite the generated parts: the settings table, the OpenAPI document
    text = re.sub(
        r"(<!-- settings:begin -->\n).*?(<!-- settings:end -->)",
        lambda m: m.group(1) + settings_markdown_table() + m.group(2),
        CONFIGURATION.read_text(),
        flags=re.S,
    )
    CONFIGURATION.write_text(text)
    OPENAPI.write_text(openapi_json())

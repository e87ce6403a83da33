"""The dashboard script's pure parts, run in node (skipped where node is missing)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "service" / "ui" / "static" / "dashboard.js"
NODE = shutil.which("node") or shutil.which("nodejs")


def _call(function: str, *args: object) -> object:
    if NODE is None:
        pytest.skip("node is not installed")
    program = (
        "global.document = {addEventListener() {}}; global.window = {addEventListener() {}};"
        f"const m = require({json.dumps(str(SCRIPT))});"
        f"console.log(JSON.stringify(m.{function}(...{json.dumps(list(args))})));"
    )
    done = subprocess.run([NODE, "-e", program], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


def test_heatmap_columns_sit_at_their_true_epochs() -> None:
    columns = _call("heatmapColumns", [0, 1, 17, 28], 100, 290)  # 29 epochs on 290 px: 10 px each
    assert isinstance(columns, list)
    assert [round(c["x"]) for c in columns] == [100, 110, 270, 380]
    assert [round(c["w"]) for c in columns] == [10, 160, 110, 10]  # each reaches the next sample
    every = _call("heatmapColumns", [0, 1, 2, 3], 0, 400)
    assert [round(c["x"]) for c in every] == [0, 100, 200, 300]  # every epoch sampled: equal steps
    assert _call("heatmapColumns", [], 0, 100) == []

"""The README's curl-only walkthrough (docs/walkthrough.sh), run for real against ``gpuyard up``.

The end-to-end acceptance test: a Highway job on digits trains in the real worker and trainer, succeeds,
and the model.h5 downloaded with curl loads in bare Keras with test accuracy >= 0.9.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import site
import subprocess
import sys
from pathlib import Path

import pytest
from api_helpers import free_port
from stack_helpers import REPO, alive, clean_env, gpuyard_up

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_walkthrough_trains_and_the_model_loads_in_bare_keras(tmp_path: Path) -> None:
    data_dir = tmp_path / "stack"
    work = tmp_path / "work"
    work.mkdir()
    # The model is loaded by an interpreter that cannot import gpuyard at all: no site processing (so
    # the editable install's .pth is not read), only the venv's site-packages on its path.
    bare_python = tmp_path / "bare-python"
    bare_python.write_text(
        f"#!/bin/sh\nexec env PYTHONPATH={site.getsitepackages()[0]} {sys.executable} -S \"$@\"\n"
    )
    bare_python.chmod(0o755)
    with gpuyard_up(data_dir, free_port()) as stack:
        env = clean_env(
            BARE_PYTHON=str(bare_python),
            GPUYARD_URL=stack.url,
            GPUYARD_DATA_DIR=os.path.relpath(data_dir, work),  # relative to the caller, as a user would give it
            WORK=str(work),
        )
        result = subprocess.run(
            ["bash", str(REPO / "docs" / "walkthrough.sh")],
            capture_output=True, text=True, env=env, cwd=work, timeout=900,
        )  # fmt: skip
        logs = "".join(
            f"\n--- {p.name} ---\n" + p.read_text(errors="replace")[-3000:]
            for p in sorted((data_dir / "logs").glob("*.log"))
        )
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}{logs}"
        readme = _run_the_readme_curl_lines(stack.url, data_dir, tmp_path / "readme")
        assert readme.returncode == 0, f"{readme.stdout}\n{readme.stderr}"
        pids = [p.pid for p in stack.descendants()]
        stack.process.send_signal(signal.SIGINT)
        assert stack.process.wait(30) == 0

    assert [pid for pid in pids if alive(pid)] == []  # the worker's pool process and trainers went too

    out = result.stdout
    assert "final state: succeeded" in out
    assert re.search(r'^data: \{"event":"epoch_end"', out, re.MULTILINE)
    accuracy = float(re.search(r"test accuracy ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    assert accuracy >= 0.9, out
    assert (work / "model.h5").stat().st_size > 0
    assert "Total params" in readme.stdout and (tmp_path / "readme" / "model.h5").stat().st_size > 0


def _run_the_readme_curl_lines(url: str, data_dir: Path, work: Path) -> subprocess.CompletedProcess[str]:
    """The README's dozen lines of curl, as a newcomer pastes them: in a shell with the checkout's .venv on
    PATH, in a folder of their own that has the examples."""
    block = re.search(r"## A dozen lines of curl.*?```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert block, "the README lost its curl lines"
    work.mkdir()
    (work / "examples").symlink_to(REPO / "examples")
    venv_bin = str(Path(sys.executable).parent)
    env = clean_env(GPUYARD_URL=url, GPUYARD_DATA_DIR=str(data_dir), PATH=f"{venv_bin}:{os.environ['PATH']}")
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.group(1)],
        capture_output=True, text=True, env=env, cwd=work, timeout=900,
    )  # fmt: skip

"""Starting ``gpuyard up`` as a subprocess for the stack and walkthrough tests (imported by name)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[2]
GPUYARD = [sys.executable, "-c", "import sys; from cli.main import main; sys.exit(main())"]


# The suite's own trainer settings (tests/conftest.py: checkpoint and probe after every epoch) survive.
_SUITE_SETTINGS = ("GPUYARD_CHECKPOINT_SECONDS", "GPUYARD_DIAGNOSTICS_SHARE")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any GPUYARD_* setting of the caller's (but the suite's trainer settings),
    plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUYARD_") or k in _SUITE_SETTINGS}
    env.update(extra)
    return env


@dataclass
class RunningStack:
    process: subprocess.Popen[str]
    url: str
    data_dir: Path
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextmanager
def gpuyard_up(
    data_dir: Path, port: int, *, ready_timeout_s: float = 120, env: dict[str, str] | None = None
) -> Iterator[RunningStack]:
    """``gpuyard up`` on ``data_dir`` and ``port``, ready; SIGINT and (at worst) SIGKILL of its tree after.

    ``env``: GPUYARD_* settings for the stack (e.g. GPUYARD_FAKE_GPUS), on top of a clean environment.
    """
    log_path = data_dir.parent / f"{data_dir.name}-up.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*GPUYARD, "up", "--data-dir", str(data_dir), "--port", str(port), "--api-workers", "1", "--grace", "5"],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=clean_env(**(env or {})),
            cwd=REPO,
        )
    stack = RunningStack(process, f"http://127.0.0.1:{port}", data_dir, log_path)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while "ready: " not in stack.output():
            if process.poll() is not None:
                raise AssertionError(f"gpuyard up exited with {process.returncode}:\n{stack.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"gpuyard up not ready in {ready_timeout_s} s:\n{stack.output()}")
            time.sleep(0.2)
        assert requests.get(stack.url + "/v1/ready", timeout=5).status_code == 200
        yield stack
    finally:
        if process.poll() is None:
            leftovers = stack.descendants()
            process.send_signal(signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                for proc in [*leftovers, psutil.Process(process.pid)]:
                    with suppress(psutil.NoSuchProcess):
                        proc.kill()
                process.wait(10)

"""The trainer launcher: a trainer started as the supervisor, the warm pool and operations start one runs
at the CPU priority ``trainer_nice`` says."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from core.settings import Settings
from worker import procs


def _started_niceness(settings: Settings) -> int:
    """Start ``sleep`` as every trainer is started (launcher, trainer environment), and read its niceness."""
    proc = subprocess.Popen(
        procs.launcher_argv(["sleep", "30"]),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env=procs.trainer_env(settings),
    )
    try:
        deadline = time.monotonic() + 20
        while psutil.Process(proc.pid).name() != "sleep":  # exec'd past the launcher
            assert proc.poll() is None and time.monotonic() < deadline, "the launcher did not exec the trainer"
            time.sleep(0.02)
        return psutil.Process(proc.pid).nice()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("nice", [10, 3, 0])
def test_a_started_trainer_runs_at_the_niceness_the_setting_says(tmp_path: Path, nice: int) -> None:
    own = os.nice(0)
    assert _started_niceness(Settings(data_dir=tmp_path, trainer_nice=nice)) == min(19, own + nice)


def test_the_default_lowers_trainers_below_the_worker(tmp_path: Path) -> None:
    own = os.nice(0)
    if own >= 19:
        pytest.skip("this test runs at the lowest priority already")
    assert _started_niceness(Settings(data_dir=tmp_path)) > own

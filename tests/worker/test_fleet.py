"""The fleet of Celery workers: one that dies is started again alone; a crash loop stops the fleet."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from core.settings import Settings
from worker import fleet
from worker.gpus import FakeBackend


class _Plan(fleet.WorkerPlan):
    """A worker that runs ``command`` instead of Celery."""

    command: tuple[str, ...] = ()

    def argv(self, loglevel: str) -> list[str]:
        return list(self.command)


def _plan(name: str, *command: str) -> _Plan:
    plan = _Plan(gpu=None, name=name, queue=f"q.{name}", slots=1)
    plan.command = command
    return plan


def _settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:9/0")


def _wait(condition, timeout_s: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_killed_worker_is_started_again_alone(tmp_path: Path) -> None:
    sleeper = (sys.executable, "-c", "import time; time.sleep(300)")
    first, second = _plan("first", *sleeper), _plan("second", *sleeper)
    stop = threading.Event()
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(
            fleet.run_fleet(_settings(tmp_path), [first, second], backend=FakeBackend("1x1GiB", tmp_path), stop=stop)
        )
    )
    thread.start()
    try:
        _wait(lambda: first.proc is not None and second.proc is not None)
        killed, kept = first.proc.pid, second.proc.pid  # type: ignore[union-attr]
        os.kill(killed, signal.SIGKILL)
        _wait(lambda: first.proc is not None and first.proc.pid != killed)
        assert first.proc.poll() is None  # type: ignore[union-attr]
        assert second.proc.pid == kept and second.proc.poll() is None  # type: ignore[union-attr]
        assert thread.is_alive() and not result  # the fleet goes on
    finally:
        stop.set()
        thread.join(60)
    assert result == [0]
    assert first.proc.poll() is not None and second.proc.poll() is not None  # type: ignore[union-attr]


def test_a_worker_in_a_crash_loop_stops_the_fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet, "MAX_RESTARTS", 2)
    crashing = _plan("crashing", sys.executable, "-c", "raise SystemExit(3)")
    steady = _plan("steady", sys.executable, "-c", "import time; time.sleep(300)")
    started = time.monotonic()
    status = fleet.run_fleet(_settings(tmp_path), [crashing, steady], backend=FakeBackend("1x1GiB", tmp_path))
    assert status == 1 and time.monotonic() - started < 60
    assert steady.proc is not None and steady.proc.poll() is not None  # stopped with the fleet

"""gpuyard's Celery app as Flower and ``celery inspect`` see it: a worker answers ``inspect ping``, lists
both tasks, and sends the task events Flower draws (task-sent from the sender, then the worker's).

Costs about 5-10 s: one real ``celery worker`` and two ``celery inspect`` processes.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
from celery_helpers import REPO, WorkerProcess, settings_env, wait_for

from core.settings import Settings
from store import Database
from worker.celery_app import make_celery
from worker.queues import OPERATE_TASK, TRAIN_TASK, celery_sender

pytestmark = pytest.mark.slow


def _inspect(settings: Settings, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "inspect", *args, "--timeout", "10"],
        cwd=REPO,
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_inspect_ping_and_registered_answer_and_task_events_flow(
    settings: Settings, db: Database, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker(settings)
    destination = f"{worker.name}@{socket.gethostname()}"
    assert "pong" in _inspect(settings, "ping", "-d", destination)
    registered = _inspect(settings, "registered", "-d", destination)
    assert TRAIN_TASK in registered and OPERATE_TASK in registered

    app = make_celery(settings)
    seen: list[str] = []
    receivers: list[Any] = []

    def capture() -> None:
        with app.connection_for_read() as connection:
            receiver = app.events.Receiver(connection, handlers={"*": lambda event: seen.append(event["type"])})
            receivers.append(receiver)
            receiver.capture(limit=None, timeout=60)

    listener = threading.Thread(target=capture, daemon=True)
    listener.start()
    send = celery_sender(settings, task=OPERATE_TASK)

    def sent_and_done() -> bool:
        # An unknown operation id: the task finds nothing queued and returns at once. Sent again until the
        # receiver, which may not be listening yet at the first send, has seen a whole task go by.
        send("op_nosuchop2345", settings.train_queue)
        return {"task-sent", "task-received", "task-started", "task-succeeded"} <= set(seen)

    try:
        wait_for(sent_and_done, 40, "task events of gpuyard.operate", poll_s=1.0)
    finally:
        for receiver in receivers:
            receiver.should_stop = True
        listener.join(15)

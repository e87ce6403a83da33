"""The one way jobs are sent: task name, queue names, the Celery sender."""

from __future__ import annotations

import json

import pytest
import redis

from core.settings import Settings
from worker.errors import QueueUnavailable
from worker.gpus import fake_uuid
from worker.queues import TRAIN_TASK, celery_sender, cpu_queue, queue_for


def test_cpu_jobs_go_to_the_configured_queue_gpu_jobs_to_their_gpus() -> None:
    settings = Settings(train_queue="lab.cpu")
    assert queue_for("cpu", settings) == queue_for(None, settings) == cpu_queue(settings) == "lab.cpu"
    assert queue_for(fake_uuid(1), settings) == f"gpu.{fake_uuid(1)}"
    with pytest.raises(ValueError, match=r"Received: gpu_uuid='\.\./etc'"):
        queue_for("../etc", settings)


def test_celery_sender_puts_the_task_on_the_queue(settings: Settings) -> None:
    queue = cpu_queue(settings)
    celery_sender(settings)("job_abc", queue)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        messages = client.lrange(queue, 0, -1)
        assert len(messages) == 1
        headers = json.loads(messages[0])["headers"]
        assert headers["task"] == TRAIN_TASK and "job_abc" in headers["argsrepr"]
    finally:
        client.delete(queue)  # our own test queue only
        client.close()


def test_celery_sender_says_the_queue_is_unavailable_when_the_broker_is_down() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    with pytest.raises(QueueUnavailable, match="job_x was not sent"):
        celery_sender(settings)("job_x", "nowhere")

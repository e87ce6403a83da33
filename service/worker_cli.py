"""``gpuyard worker`` and ``gpuyard janitor``: start a Celery worker for one queue, or the lease janitor."""

from __future__ import annotations

import contextlib
import logging
import os
import socket

import click

from worker.celery_app import make_celery, queue_name
from worker.db import Database
from worker.janitor import celery_sender, janitor_pass, run_janitor
from worker.settings import get_settings


@click.command("worker")
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Jobs run at once by this worker (one trainer process each).",
)
@click.option(
    "--queue",
    "-Q",
    "queue",
    default=None,
    help="Queue to consume. Default: the queue the API sends to (GPUYARD_TRAIN_QUEUE).",
)
@click.option(
    "--gpu",
    default=None,
    help="Pin this worker's trainers to a GPU UUID (queue gpu.<uuid>), or 'cpu'. Default: GPUYARD_WORKER_GPU.",
)
@click.option("--name", default=None, help="Celery node name (default: <queue>@<host>).")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
def worker_command(concurrency: int, queue: str | None, gpu: str | None, name: str | None, loglevel: str) -> None:
    """Start a Celery worker that runs training jobs (prefork; trainers in their own processes)."""
    settings = get_settings()
    if gpu is not None:
        try:
            default_queue = queue_name(gpu)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--gpu") from exc
        # Every trainer this worker starts inherits the pin; the worker itself never touches CUDA.
        os.environ["GPUYARD_WORKER_GPU"] = gpu
        if gpu != "cpu":
            os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        get_settings.cache_clear()
        settings = get_settings()
    else:
        default_queue = settings.train_queue
    queue = queue or default_queue
    app = make_celery(settings)
    app.worker_main(
        [
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            str(concurrency),
            "--queues",
            queue,
            "--hostname",
            name or f"{queue}@{socket.gethostname()}",
            "--loglevel",
            loglevel,
        ]
    )


@click.command("janitor")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=None,
    help="Seconds between passes. Default: GPUYARD_JANITOR_INTERVAL_S.",
)
@click.option("--once", is_flag=True, help="Run one pass, print what it did, and exit.")
def janitor_command(interval: float | None, once: bool) -> None:
    """Requeue jobs whose worker died (expired lease); give up on those out of attempts."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = get_settings()
    if once:
        report = janitor_pass(Database(settings.database_url), celery_sender(settings))
        click.echo(f"requeued: {report.requeued}  interrupted: {report.interrupted}  cancelled: {report.cancelled}")
        return
    with contextlib.suppress(KeyboardInterrupt):
        run_janitor(settings, interval)

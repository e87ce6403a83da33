"""``gpuyard worker`` and ``gpuyard janitor``: Celery workers (one per GPU with ``--gpus``), or the janitor."""

from __future__ import annotations

import contextlib
import logging
import os
import socket

import click

from worker.celery_app import make_celery
from worker.db import Database
from worker.dispatch import Dispatcher, celery_send
from worker.fleet import plan_workers, run_fleet
from worker.gpus import get_backend
from worker.janitor import janitor_pass, run_janitor
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)


def worker_argv(gpus: str = "all", concurrency: int = 1) -> list[str]:
    """The ``gpuyard worker`` arguments that serve every GPU of this host (a CPU worker without GPUs):
    what ``gpuyard up`` runs."""
    return ["worker", "--gpus", gpus, "--concurrency", str(concurrency)]


@click.command("worker")
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Jobs run at once by this worker (one trainer process each); with --gpus, per GPU (its slots).",
)
@click.option(
    "--gpus",
    default=None,
    help="Start one worker per GPU: 'all', NVML indices '0,1', or UUIDs 'GPU-…' (comma-separated). "
    "Each worker is pinned (CUDA_VISIBLE_DEVICES=<uuid>), consumes gpu.<uuid> and sends heartbeats. "
    "Without GPUs: one CPU worker.",
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
    help="One GPU by UUID (the same as --gpus UUID), or 'cpu' (a CPU worker on GPUYARD_TRAIN_QUEUE).",
)
@click.option("--name", default=None, help="Celery node name (default: <queue>@<host>).")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
def worker_command(
    concurrency: int, gpus: str | None, queue: str | None, gpu: str | None, name: str | None, loglevel: str
) -> None:
    """Start a Celery worker that runs training jobs (prefork; trainers in their own processes)."""
    settings = get_settings()
    if gpu is not None and gpu != "cpu" and gpus is None:
        gpus = gpu  # one GPU: the same fleet of one, with heartbeats
    if gpus is not None:
        if queue is not None or name is not None:
            raise click.UsageError("--queue and --name do not combine with --gpus (each GPU gets gpu.<uuid>)")
        _run_gpu_workers(settings, gpus, concurrency, loglevel)
        return
    if gpu == "cpu":
        os.environ["GPUYARD_WORKER_GPU"] = "cpu"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU worker's trainers never see a GPU
        get_settings.cache_clear()
        settings = get_settings()
    # CPU jobs go to train_queue (worker/dispatch.py), whatever the worker's GPU setting.
    _start_celery(settings, queue or settings.train_queue, concurrency, name, loglevel)


def _run_gpu_workers(settings: Settings, gpus: str, concurrency: int, loglevel: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    backend = get_backend(settings)
    try:
        workers = plan_workers(backend, gpus, concurrency)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--gpus") from exc
    if not workers:
        click.echo(f"gpuyard worker: no GPU found; starting one CPU worker on queue {settings.train_queue}", err=True)
        _start_celery(settings, settings.train_queue, concurrency, None, loglevel)
        return
    raise SystemExit(run_fleet(settings, workers, loglevel=loglevel, backend=backend))


def _start_celery(settings: Settings, queue: str, concurrency: int, name: str | None, loglevel: str) -> None:
    make_celery(settings).worker_main(
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
        db = Database(settings.database_url)
        dispatcher = Dispatcher(settings, db, celery_send(settings))
        try:
            report = janitor_pass(db, None, dispatcher=dispatcher)
        finally:
            dispatcher.close()
        click.echo(f"requeued: {report.requeued}  interrupted: {report.interrupted}  cancelled: {report.cancelled}")
        return
    with contextlib.suppress(KeyboardInterrupt):
        run_janitor(settings, interval)

"""``gpuyard worker`` and ``gpuyard janitor``: Celery workers (one per GPU with ``--gpus``, plus one on the CPU
queue), or the janitor."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import socket
import time

import click

from core.settings import Settings, get_settings
from store import Database
from store.errors import DatabaseUnavailable, JobDBError
from worker.celery_app import make_celery
from worker.dispatch import Dispatcher
from worker.fleet import WorkerPlan, plan_workers, run_fleet
from worker.gpus import GpuBackend, get_backend
from worker.janitor import janitor_pass, run_janitor
from worker.notify import enqueue_notifications
from worker.queues import celery_notify_sender, celery_sender, cpu_queue, notify_queue

log = logging.getLogger(__name__)


def plan_host_workers(
    settings: Settings,
    gpus: str,
    concurrency: int | None,
    *,
    cpu_worker: bool = True,
    expect_gpus: int | None = None,
    backend: GpuBackend | None = None,
) -> tuple[list[WorkerPlan], bool]:
    """What ``gpuyard worker --gpus gpus`` runs: ``(workers, fleet)``.

    ``fleet`` True: one child per GPU, plus one on the CPU queue unless ``cpu_worker`` is False.
    ``fleet`` False: no GPU was found, and the one worker (on the CPU queue) runs in this process.

    Slots: ``concurrency`` for every worker when given; else ``gpu_slots`` (4) per GPU, so the dispatcher
    packs jobs by their fractions, and 1 for the CPU worker.

    Raises:
        click.BadParameter: ``gpus`` names a GPU that does not exist.
        click.ClickException: not ``expect_gpus`` GPUs were selected, or no GPU and no CPU worker either.
    """
    backend = backend or get_backend(settings)
    try:
        workers = plan_workers(
            backend,
            gpus,
            concurrency or settings.gpu_slots,
            cpu_queue=cpu_queue(settings) if cpu_worker else None,
            cpu_slots=concurrency or 1,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--gpus") from exc
    found = [w.gpu.uuid for w in workers if w.gpu is not None]
    if expect_gpus is not None and len(found) != expect_gpus:
        raise click.ClickException(
            f"Expected exactly {expect_gpus} GPU(s) (--expect-gpus) for --gpus {gpus!r}. Received: {len(found)} "
            f"{found}. In a container: is the NVIDIA container toolkit installed on the host, and does the "
            "service reserve exactly one device (deploy.resources.reservations.devices, one device_ids entry)?"
        )
    for worker in workers:
        worker.extra_queues = (notify_queue(settings),)
    if workers:
        return workers, True
    if not cpu_worker:
        raise click.ClickException(
            f"no GPU found for --gpus {gpus!r}, and --no-cpu-worker leaves nothing else to run "
            "(is the NVIDIA driver reachable from here?)"
        )
    host = socket.gethostname()
    queue = settings.train_queue
    only = WorkerPlan(gpu=None, name=f"{queue}@{host}", queue=queue, slots=concurrency or 1)
    only.extra_queues = (notify_queue(settings),)
    return [only], False


def command_line(env: dict[str, str], argv: list[str]) -> str:
    """``VAR=value … argv`` as a shell would read it."""
    return " ".join([*(f"{name}={shlex.quote(value)}" for name, value in env.items()), shlex.join(argv)])


@click.command("worker")
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    default=None,
    help="Jobs run at once by this worker (one trainer process each); with --gpus, per GPU (its slots) "
    "and for the CPU worker. Default: GPUYARD_GPU_SLOTS (4) per GPU, packed by memory fraction; 1 on the CPU.",
)
@click.option(
    "--gpus",
    default=None,
    help="Start one worker per GPU: 'all', NVML indices '0,1', or UUIDs 'GPU-…' (comma-separated). "
    "Each worker is pinned (CUDA_VISIBLE_DEVICES=<uuid>), consumes gpu.<uuid> and sends heartbeats; one "
    "more worker consumes the CPU queue (GPUYARD_TRAIN_QUEUE) with no GPU visible, unless --no-cpu-worker. "
    "Without GPUs: one CPU worker.",
)
@click.option(
    "--no-cpu-worker",
    is_flag=True,
    help="With --gpus: start only the per-GPU workers, none on the CPU queue (another worker serves it); "
    "then finding no GPU is an error.",
)
@click.option(
    "--expect-gpus",
    type=click.IntRange(min=1),
    default=None,
    help="With --gpus: refuse to start unless exactly this many GPUs are selected (a GPU container: 1).",
)
@click.option(
    "--queue",
    "-Q",
    "queue",
    default=None,
    help="Queue to consume. Default: the queue the API sends CPU jobs to (GPUYARD_TRAIN_QUEUE).",
)
@click.option(
    "--gpu",
    default=None,
    help="One GPU by UUID (the same as --gpus UUID), or 'cpu' (a CPU worker on GPUYARD_TRAIN_QUEUE).",
)
@click.option("--name", default=None, help="Celery node name (default: <queue>@<host>).")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option(
    "--check",
    is_flag=True,
    help="Validate the options, print each worker command line this would run (environment, queue, node "
    "name), and exit without starting anything.",
)
def worker_command(
    concurrency: int | None,
    gpus: str | None,
    no_cpu_worker: bool,
    expect_gpus: int | None,
    queue: str | None,
    gpu: str | None,
    name: str | None,
    loglevel: str,
    check: bool,
) -> None:
    """Start a Celery worker that runs training jobs (prefork; trainers in their own processes)."""
    settings = get_settings()
    if gpu is not None and gpu != "cpu" and gpus is None:
        gpus = gpu  # one GPU: the same fleet of one, with heartbeats
    if gpus is not None:
        if queue is not None or name is not None:
            raise click.UsageError("--queue and --name do not combine with --gpus (each GPU gets gpu.<uuid>)")
        workers, fleet = plan_host_workers(
            settings, gpus, concurrency, cpu_worker=not no_cpu_worker, expect_gpus=expect_gpus
        )
        if check:
            _print_plan(workers, loglevel, fleet)
            return
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
        if fleet:
            raise SystemExit(run_fleet(settings, workers, loglevel=loglevel))
        click.echo(f"gpuyard worker: no GPU found; starting one CPU worker on queue {settings.train_queue}", err=True)
        _start_celery(settings, workers[0], loglevel, pin=True)
        return
    if no_cpu_worker or expect_gpus is not None:
        raise click.UsageError("--no-cpu-worker and --expect-gpus need --gpus")
    # CPU jobs go to train_queue (worker/dispatch.py), whatever the worker's GPU setting.
    queue = queue or settings.train_queue
    worker = WorkerPlan(
        gpu=None,
        name=name or f"{queue}@{socket.gethostname()}",
        queue=queue,
        slots=concurrency or 1,
        extra_queues=(notify_queue(settings),),
    )
    if check:
        _print_plan([worker], loglevel, False, pin=gpu == "cpu")
        return
    _start_celery(settings, worker, loglevel, pin=gpu == "cpu")


def _print_plan(workers: list[WorkerPlan], loglevel: str, fleet: bool, pin: bool = True) -> None:
    """One line per worker on stdout: the command it runs, with its environment (pinning)."""
    how = "one child per line, with GPU heartbeats" if fleet else "in this process"
    click.echo(f"gpuyard worker --check: {len(workers)} worker(s), {how}; nothing started", err=True)
    for worker in workers:
        click.echo(command_line(worker.pinning() if pin else {}, worker.argv(loglevel)))


def _require_schema(settings: Settings, wait_s: float = 300.0) -> None:
    """Refuse to start on a job DB whose schema is behind (an empty one is created at head).

    A database that does not answer is waited for (up to ``wait_s``, logged), not refused: a worker or janitor
    restarted during an outage would otherwise exit again at once, over and over, until it was back.
    """
    db = Database(settings.database_url)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                db.ensure_schema()
                return
            except DatabaseUnavailable as exc:
                if time.monotonic() > deadline:
                    raise click.ClickException(str(exc)) from exc
                log.warning("the job database does not answer (%s); waiting for it", exc)
                time.sleep(2)
            except JobDBError as exc:
                raise click.ClickException(str(exc)) from exc
    finally:
        db.dispose()


def _start_celery(settings: Settings, worker: WorkerPlan, loglevel: str, *, pin: bool) -> None:
    _require_schema(settings)
    if pin:  # a CPU worker's trainers never see a GPU
        os.environ.update(worker.pinning())
        get_settings.cache_clear()
        settings = get_settings()
    make_celery(settings).worker_main(worker.celery_args(loglevel))


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
    _require_schema(settings)
    if once:
        db = Database(settings.database_url)
        dispatcher = Dispatcher(settings, db, celery_sender(settings))
        try:
            report = janitor_pass(db, dispatcher)
            notified = enqueue_notifications(db, celery_notify_sender(settings))
        finally:
            dispatcher.close()
        click.echo(
            f"requeued: {report.requeued}  interrupted: {report.interrupted}  cancelled: {report.cancelled}  "
            f"notifications queued: {notified}"
        )
        return
    with contextlib.suppress(KeyboardInterrupt):
        run_janitor(settings, interval)

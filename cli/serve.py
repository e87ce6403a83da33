"""``gpuyard api`` (gunicorn serving the API) and ``gpuyard up`` (the whole local stack until Ctrl-C)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import click

from cli.workers import plan_host_workers
from core.settings import get_settings
from service.stack import Stack, StackConfig, StackError, gunicorn_argv


@click.command("api", context_settings={"ignore_unknown_options": True})
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1), help="gunicorn processes.")
@click.option(
    "--connections",
    default=2000,
    show_default=True,
    type=click.IntRange(min=10),
    help="Connections (requests and open event streams) each process serves at once.",
)
@click.argument("gunicorn_args", nargs=-1, type=click.UNPROCESSED)
def api(host: str, port: int, workers: int, connections: int, gunicorn_args: tuple[str, ...]) -> None:
    """Serve the API with gunicorn (gevent workers); extra arguments go to gunicorn as they are."""
    extra = ("--worker-connections", str(connections), *gunicorn_args)
    argv = gunicorn_argv(host, port, workers, extra=extra)
    os.execv(argv[0], argv)


@click.command("up")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the stack keeps its DB, storage, logs (default: GPUYARD_DATA_DIR, else ./.gpuyard).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the API listens on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--api-workers", default=2, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--concurrency",
    default=None,
    type=click.IntRange(min=1),
    help="Jobs run at once per GPU and on the CPU. Default: GPUYARD_GPU_SLOTS (4) per GPU, packed by memory "
    "fraction, and 1 on the CPU.",
)
@click.option("--grace", "grace_s", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds the processes get to stop before they are killed.")  # fmt: skip
def up(data_dir: Path | None, host: str, port: int, api_workers: int, concurrency: int | None, grace_s: float) -> None:
    """Run the whole local stack (Redis, API, one CPU worker, janitor) until Ctrl-C."""
    settings = get_settings()
    data_dir = (data_dir or settings.data_dir).resolve()
    config = StackConfig(
        data_dir=data_dir,
        host=host,
        port=port,
        api_workers=api_workers,
        worker_concurrency=concurrency,
        redis_url=os.environ.get("GPUYARD_REDIS_URL") or None,
        grace_s=grace_s,
    )
    stack = Stack(config, say=click.echo)
    stop_signal: list[int] = []

    def request_stop(signum: int, _frame: object) -> None:
        stop_signal.append(signum)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    failed: StackError | None = None
    click.echo(f"gpuyard up: data in {data_dir}")
    try:
        stack.start(stopping=lambda: bool(stop_signal))
        _print_started(stack)
        stack.wait(stopping=lambda: bool(stop_signal))
    except StackError as exc:
        failed = exc
    except KeyboardInterrupt:
        pass
    finally:
        if stack.all_children():
            click.echo("stopping…")
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed is not None:
        raise click.ClickException(str(failed))
    click.echo("stopped")


def _worker_lines(stack: Stack) -> list[str]:
    """What the one ``gpuyard worker --gpus all`` child runs, as it plans it: a worker per GPU and one
    on the CPU queue, or one CPU worker when there is no GPU."""
    concurrency = stack.config.worker_concurrency
    try:
        workers, _ = plan_host_workers(stack.settings or get_settings(), "all", concurrency)
    except click.ClickException as exc:
        return [f"--gpus all, concurrency {concurrency or 'default'} ({exc.format_message()})"]
    return [
        f"{'cpu' if w.gpu is None else f'GPU {w.gpu.index} {w.gpu.uuid}'}, queue {w.queue}, concurrency {w.slots}"
        for w in workers
    ]


def _print_started(stack: Stack) -> None:
    config = stack.config
    pids = {child.name: child.process.pid for child in stack.all_children()}
    redis_note = f"private redis-server, pid {pids['redis']}" if "redis" in pids else "GPUYARD_REDIS_URL"
    click.echo(f"  redis    {stack.redis_url}  ({redis_note})")
    click.echo(f"  api      {config.url}  (gunicorn, {config.api_workers} workers, pid {pids['api']})")
    for line in _worker_lines(stack):
        click.echo(f"  worker   {line}  (pid {pids['worker']})")
    click.echo(f"  janitor  pid {pids['janitor']}")
    click.echo(f"  logs     {stack.data_dir / 'logs'}")
    token_file = stack.data_dir / "admin-token"
    if stack.admin_token:
        kept = "created now, kept in" if stack.admin_created else "kept in"
        click.echo(f"admin token ({kept} {token_file}, mode 0600):")
        click.echo(f"  export GPUYARD_URL={config.url} GPUYARD_TOKEN={stack.admin_token}")
    else:
        click.echo(
            f"user 'admin' exists but {token_file} is gone (only the token's hash is stored); create a user "
            f"with: GPUYARD_DATA_DIR={stack.data_dir} gpuyard users create NAME --admin"
        )
    click.echo(f"ready: {config.url}   (Ctrl-C stops everything)")

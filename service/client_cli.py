"""The ``gpuyard`` commands that talk to the API (datasets, submit, status, logs, cancel, download) and
the ones that run it (``api``: gunicorn; ``up``: the whole local stack).

The API's URL and token come from ``--url``/``--token``, else ``GPUYARD_URL``/``GPUYARD_TOKEN``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Column, Table

from core.names import ARTIFACT_NAMES, MODEL_H5
from core.settings import get_settings
from core.states import CANCELLED, FAILED, INTERRUPTED, JOB_STATES, RUNNING, SUCCEEDED, TERMINAL_STATES
from service.client import Client, ClientError, Event
from service.stack import Stack, StackConfig, StackError, gunicorn_argv

F = TypeVar("F", bound=Callable[..., Any])

# Exit codes of `gpuyard logs -f` and `gpuyard submit --follow`, by the job's final state.
FOLLOW_EXIT_CODES = {SUCCEEDED: 0, FAILED: 1, INTERRUPTED: 3, CANCELLED: 4}
assert set(FOLLOW_EXIT_CODES) == set(TERMINAL_STATES)


class ApiCallFailed(click.ClickException):
    """A ClientError shown the way a person reads it: the API's detail, then every problem listed."""

    def __init__(self, exc: ClientError) -> None:
        lines = [str(exc)]
        for problem in exc.problems_raw:
            where = f" [{problem.get('field')}]" if problem.get("field") else ""
            lines.append(f"  - {problem.get('code', '?')}{where}: {problem.get('detail', '')}")
        super().__init__("\n".join(lines))


@contextlib.contextmanager
def api_errors() -> Iterator[None]:
    try:
        yield
    except ClientError as exc:
        raise ApiCallFailed(exc) from exc


def client_options(command: F) -> F:
    """``--url`` and ``--token``; the command receives a ready :class:`Client` as ``client``."""

    @click.option("--url", help="API base URL. Default: GPUYARD_URL, else http://127.0.0.1:8000.")
    @click.option("--token", help="Bearer token. Default: GPUYARD_TOKEN.")
    @functools.wraps(command)
    def wrapper(*args: Any, url: str | None, token: str | None, **kwargs: Any) -> Any:
        settings = get_settings()
        with api_errors(), Client(url or settings.url, token or settings.token or None) as client:
            return command(*args, client=client, **kwargs)

    return wrapper  # type: ignore[return-value]


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)  # long lines stay whole in logs and pipes


# ── data sets ─────────────────────────────────────────────────────────────────────────────────────────
@click.group("datasets")
def datasets() -> None:
    """Upload and list HDF5 data sets."""


@datasets.command("upload")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="A name to remember it by (default: the file's name).")
@click.option("--num-classes", type=int, help="Declared number of classes; labels must lie in [0, N).")
@client_options
def datasets_upload(client: Client, file: Path, name: str | None, num_classes: int | None) -> None:
    """Upload FILE (streamed); print the data set's id on stdout, its summary on stderr."""
    keys: dict[str, int] = {} if num_classes is None else {"num_classes": num_classes}
    dataset = client.upload_dataset(file, name=name, **keys)
    summary = dataset.get("summary") or {}
    click.echo(
        f"data set {dataset['id']}: {dataset.get('name') or file.name}, {dataset['size_bytes']} bytes, "
        f"sha256 {dataset['sha256'][:12]}…",
        err=True,
    )
    if summary:
        click.echo(_summary_line(summary), err=True)
    click.echo(dataset["id"])


def _summary_line(summary: dict[str, Any]) -> str:
    """``rows: train 1438, test 359 · input (64,) · target integer_labels, 10 classes``."""
    rows = ", ".join(f"{split} {n}" for split, n in (summary.get("rows") or {}).items())
    parts = [f"rows: {rows}"] if rows else []
    if summary.get("input_shape") is not None:
        parts.append(f"input {tuple(summary['input_shape'])}")
    if summary.get("target"):
        classes = f", {summary['num_classes']} classes" if summary.get("num_classes") else ""
        parts.append(f"target {summary['target']}{classes}")
    return "  " + " · ".join(parts)


@datasets.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON instead of a table.")
@client_options
def datasets_list(client: Client, as_json: bool) -> None:
    """List your data sets (an admin's: everyone's), newest first."""
    found = client.list_datasets()
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    table = Table(Column("id", no_wrap=True), "name", "owner", "size", "sha256", "uploaded")
    for dataset in found:
        table.add_row(
            dataset["id"],
            dataset.get("name") or "",
            dataset["owner"],
            _size(dataset["size_bytes"]),
            dataset["sha256"][:12],
            str(dataset["created_at"])[:19].replace("T", " "),
        )
    _console().print(table)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# ── jobs ──────────────────────────────────────────────────────────────────────────────────────────────
@click.command("submit")
@click.argument("spec_file", metavar="SPEC.json", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dataset", required=True, help="Id of one of your data sets (gpuyard datasets upload).")
@click.option("--dry-run", is_flag=True, help="Build the model on the data set's shapes; queue nothing.")
@click.option("--follow", "-f", is_flag=True, help="Then follow the job like `gpuyard logs -f`.")
@client_options
def submit(client: Client, spec_file: Path, dataset: str, dry_run: bool, follow: bool) -> None:
    """Submit a job: SPEC.json (see examples/specs/) on a data set. Prints the job id on stdout."""
    try:
        spec = json.loads(spec_file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"{spec_file} is not valid JSON: {exc}", param_hint="SPEC.json") from None
    if not isinstance(spec, dict):
        raise click.BadParameter(f"expected a JSON object in {spec_file}", param_hint="SPEC.json")
    result = client.submit(dataset, spec, dry_run=dry_run)
    if dry_run:
        _print_dry_run(result)
        return
    click.echo(f"job {result['id']} {result['state']}", err=True)
    click.echo(result["id"])
    if follow:
        sys.exit(follow_job(client, result["id"]))


def _print_dry_run(result: dict[str, Any]) -> None:
    report = result.get("report") or {}
    console = _console()
    layers = report.get("layers") or []
    if layers and isinstance(layers[0], dict):
        table = Table(*layers[0].keys(), title="layers")
        for layer in layers:
            table.add_row(*(str(v) for v in layer.values()))
        console.print(table)
    rest = {k: v for k, v in report.items() if k != "layers"}
    console.print_json(json.dumps(rest, default=str))


@click.command("status")
@click.argument("job", required=False)
@click.option("--state", type=click.Choice(JOB_STATES), help="Only jobs in this state.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON instead of a table.")
@client_options
def status(client: Client, job: str | None, state: str | None, as_json: bool) -> None:
    """Show one JOB in detail, or list your jobs."""
    if job is not None:
        found = client.job(job)
        if as_json:
            click.echo(json.dumps(found, indent=2))
            return
        _print_job(found)
        return
    jobs = client.jobs(state=state)
    if as_json:
        click.echo(json.dumps(jobs, indent=2))
        return
    table = Table(
        Column("id", no_wrap=True), Column("state", no_wrap=True), "family", "owner", "progress", "queued", "reason"
    )
    for item in jobs:
        table.add_row(
            item["id"],
            _styled_state(item["state"]),
            str((item.get("spec") or {}).get("architecture", {}).get("family", "")),
            item["owner"],
            _progress_text(item.get("progress")),
            str(item["queued_at"])[:19].replace("T", " "),
            item.get("error_reason") or "",
        )
    _console().print(table)


def _styled_state(state: str) -> str:
    colour = {SUCCEEDED: "green", FAILED: "red", INTERRUPTED: "yellow", RUNNING: "cyan"}.get(state)
    return f"[{colour}]{state}[/]" if colour else state


def _progress_text(progress: dict[str, Any] | None) -> str:
    if not progress:
        return ""
    parts = []
    if progress.get("epoch") is not None:
        parts.append(f"epoch {progress['epoch']}" + (f"/{progress['epochs']}" if progress.get("epochs") else ""))
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4g}")
    return ", ".join(parts)


def health_text(finding: dict[str, Any]) -> str:
    """One health finding for a terminal: kind and epoch, what was measured, then the remedy."""
    epoch = finding.get("epoch")
    when = f" at epoch {epoch}" if epoch is not None else " (predicted)"
    return (
        f"[yellow]{finding.get('kind', '?')}[/]{when}: {finding.get('detail', '')}\n"
        f"  remedy: {finding.get('remedy', '')}"
    )


def _print_job(job: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    rows: list[tuple[str, str]] = [
        ("id", job["id"]),
        ("state", _styled_state(job["state"])),
        ("owner", job["owner"]),
        ("dataset", job.get("dataset") or "(deleted)"),
        ("family", str((job.get("spec") or {}).get("architecture", {}).get("family", ""))),
        ("attempts", f"{job['attempts']}/{job['max_attempts']}"),
        ("gpu", job.get("gpu") or ""),
        ("queued", str(job["queued_at"])),
        ("started", str(job.get("started_at") or "")),
        ("finished", str(job.get("finished_at") or "")),
        ("progress", _progress_text(job.get("progress"))),
    ]
    metrics = (job.get("progress") or {}).get("metrics")
    if metrics:
        rows.append(("metrics", ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, int | float))))
    if job.get("error_reason"):
        rows.append(("reason", job["error_reason"]))
        rows.append(("detail", job.get("error_detail") or ""))
    if job.get("exit_code") is not None:
        rows.append(("exit code", str(job["exit_code"])))
    if job.get("cancel_requested") and job["state"] not in TERMINAL_STATES:
        rows.append(("cancel", "requested"))
    for finding in job.get("health") or []:
        rows.append(("health", health_text(finding)))
    for key, value in rows:
        table.add_row(f"[bold]{key}[/]", value)
    _console().print(table)


@click.command("cancel")
@click.argument("job")
@client_options
def cancel(client: Client, job: str) -> None:
    """Cancel JOB: a queued one at once, a running one after its trainer checkpoints and stops."""
    found = client.cancel(job)
    if found["state"] in TERMINAL_STATES:
        click.echo(f"job {job}: {found['state']}")
    else:
        click.echo(f"job {job}: cancel requested ({found['state']}); `gpuyard logs -f {job}` shows when it stops")


@click.command("logs")
@click.argument("job")
@click.option("--follow", "-f", is_flag=True, help="Follow the job's progress live until it ends.")
@client_options
def logs(client: Client, job: str, follow: bool) -> None:
    """Print JOB's trainer log; with -f, follow its progress live (exit code: 0 succeeded, 1 failed,
    3 interrupted, 4 cancelled)."""
    if follow:
        sys.exit(follow_job(client, job))
    click.echo(client.logs(job), nl=False)


class _Follower:
    """Renders a job's events: a progress bar per epoch and per batch, one line per finished epoch."""

    def __init__(self, console: Console, progress: Progress) -> None:
        self.console = console
        self.progress = progress
        self.epochs: TaskID | None = None
        self.batches: TaskID | None = None
        self.final_state: str | None = None

    def handle(self, event: Event) -> None:
        try:
            data = event.json()
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        handler = getattr(self, "on_" + event.event, None)
        if handler is not None:
            handler(data)

    def _fields(self, data: dict[str, Any]) -> dict[str, str]:
        loss = data.get("loss")
        rate = data.get("samples_per_s")
        eta = data.get("eta_s")
        return {
            "loss": f"loss {loss:.4f}" if isinstance(loss, int | float) else "",
            "rate": f"{rate:,.0f} samples/s" if isinstance(rate, int | float) else "",
            "eta": f"ETA {_duration(eta)}" if isinstance(eta, int | float) else "",
        }

    def on_state(self, data: dict[str, Any]) -> None:
        state = data.get("state", "?")
        if state in TERMINAL_STATES:
            self.final_state = state
            reason = f" ({data['reason']})" if data.get("reason") else ""
            detail = f": {data['detail']}" if data.get("detail") and state != SUCCEEDED else ""
            self.console.print(f"job {_styled_state(state)}{reason}{detail}")
        elif state == "running":
            where = f" on {data['gpu']}" if data.get("gpu") else ""
            self.console.print(f"running, attempt {data.get('attempt', '?')}{where}")
        else:
            self.console.print(f"{state}" + (f" ({data['reason']})" if data.get("reason") else ""))

    def on_started(self, data: dict[str, Any]) -> None:
        resumed = data.get("resumed_from_epoch")
        self.console.print(
            "trainer started"
            + (f", resuming after epoch {resumed}" if resumed else "")
            + (f", backend {data['backend']}" if data.get("backend") else "")
        )
        if data.get("epochs"):
            self._epochs_task(int(data["epochs"]), int(resumed or 0))

    def _epochs_task(self, total: int, completed: int) -> None:
        if self.epochs is None:
            self.epochs = self.progress.add_task("epochs", total=total, completed=completed, loss="", rate="", eta="")
        else:
            self.progress.update(self.epochs, total=total, completed=completed)

    def on_epoch_start(self, data: dict[str, Any]) -> None:
        epoch = int(data.get("epoch", 1))
        if data.get("epochs"):
            self._epochs_task(int(data["epochs"]), epoch - 1)
        steps = data.get("steps")
        label = f"epoch {epoch}"
        if self.batches is None:
            self.batches = self.progress.add_task(label, total=steps, loss="", rate="", eta="")
        else:
            self.progress.reset(self.batches, total=steps, description=label, loss="", rate="", eta="")

    def on_batch(self, data: dict[str, Any]) -> None:
        if self.batches is None:
            self.on_epoch_start({"epoch": data.get("epoch", 1), "steps": data.get("steps")})
        assert self.batches is not None
        self.progress.update(self.batches, completed=data.get("step", 0), total=data.get("steps"), **self._fields(data))

    def on_epoch_end(self, data: dict[str, Any]) -> None:
        epoch = data.get("epoch", "?")
        epochs = data.get("epochs")
        if self.epochs is not None and isinstance(epoch, int):
            self.progress.update(self.epochs, completed=epoch, **self._fields(data))
        if self.batches is not None:
            task = self.progress.tasks[self.batches]
            self.progress.update(self.batches, completed=task.total or task.completed)
        metrics = data.get("metrics") or {}
        shown = [f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, int | float)]
        fields = self._fields(data)
        self.console.print(
            f"epoch {epoch}{f'/{epochs}' if epochs else ''}  "
            + "  ".join(x for x in [fields["loss"], *shown, fields["rate"], fields["eta"]] if x)
        )

    def on_checkpoint(self, data: dict[str, Any]) -> None:
        pass  # one per epoch; the epoch line already says the epoch ended

    def on_finished(self, data: dict[str, Any]) -> None:
        # metrics: {"train": {...}, "val": {...}, "test": {"accuracy": 0.97, "loss": 0.1}} (a split may be null)
        shown = []
        for split, values in (data.get("metrics") or {}).items():
            if isinstance(values, dict):
                shown += [f"{split} {k} {v:.4f}" for k, v in values.items() if isinstance(v, int | float)]
            elif isinstance(values, int | float):
                shown.append(f"{split} {values:.4f}")
        epochs = data.get("epochs_completed")
        early = ", stopped early" if data.get("stopped_early") else ""
        self.console.print(
            "finished"
            + (f" after {epochs} epochs{early}" if epochs else "")
            + (f": {', '.join(shown)}" if shown else "")
        )

    def on_health(self, data: dict[str, Any]) -> None:
        findings = data.get("findings") or []
        if not findings:
            self.console.print(f"health: the earlier findings cleared after epoch {data.get('epoch', '?')}")
        for finding in findings:
            if isinstance(finding, dict):
                self.console.print("health: " + health_text(finding))

    def on_failed(self, data: dict[str, Any]) -> None:
        self.console.print(f"[red]failed[/]: {data.get('reason', '?')}: {data.get('detail', '')}")
        for problem in data.get("problems") or []:
            if isinstance(problem, dict):
                where = f" [{problem.get('field')}]" if problem.get("field") else ""
                self.console.print(f"  - {problem.get('code', '?')}{where}: {problem.get('detail', '')}")


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def follow_job(client: Client, job_id: str, console: Console | None = None) -> int:
    """Follow a job's events with live progress bars until its terminal event.

    Returns:
        The exit code for its final state (:data:`FOLLOW_EXIT_CODES`).
    """
    console = console or _console()
    progress = Progress(
        TextColumn("{task.description:>9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[eta]}"),
        console=console,
        transient=True,
    )
    follower = _Follower(console, progress)
    with progress:
        for event in client.events(job_id):
            follower.handle(event)
    state = follower.final_state or client.job(job_id)["state"]
    if state not in TERMINAL_STATES:
        raise click.ClickException(f"the event stream of job {job_id} ended while it is {state}")
    return FOLLOW_EXIT_CODES[state]


@click.command("download")
@click.argument("job")
@click.option(
    "--artifact",
    default=MODEL_H5,
    show_default=True,
    type=click.Choice(ARTIFACT_NAMES),
)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="File or folder (default: ./<artifact>).")
@client_options
def download(client: Client, job: str, artifact: str, output: Path | None) -> None:
    """Download an artifact of JOB; its SHA-256 is checked before the file appears."""
    path = client.download(job, artifact, output or Path(artifact))
    click.echo(str(path))


# ── running the service ───────────────────────────────────────────────────────────────────────────────
@click.command("api", context_settings={"ignore_unknown_options": True})
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1), help="gunicorn processes.")
@click.option("--threads", default=8, show_default=True, type=click.IntRange(min=1), help="Threads per process.")
@click.argument("gunicorn_args", nargs=-1, type=click.UNPROCESSED)
def api(host: str, port: int, workers: int, threads: int, gunicorn_args: tuple[str, ...]) -> None:
    """Serve the API with gunicorn (gthread); extra arguments go to gunicorn as they are."""
    argv = gunicorn_argv(host, port, workers, threads, extra=gunicorn_args)
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
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(min=1), help="Jobs run at once.")
@click.option("--grace", "grace_s", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds the processes get to stop before they are killed.")  # fmt: skip
def up(data_dir: Path | None, host: str, port: int, api_workers: int, concurrency: int, grace_s: float) -> None:
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
    from service.worker_cli import plan_host_workers  # imports Celery: only for `gpuyard up`

    concurrency = stack.config.worker_concurrency
    try:
        workers, _ = plan_host_workers(stack.settings or get_settings(), "all", concurrency)
    except click.ClickException as exc:
        return [f"--gpus all, concurrency {concurrency} ({exc.format_message()})"]
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

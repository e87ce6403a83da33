"""The ``gpuyard`` commands that talk to the API: datasets, submit, status, logs, cancel, download.

The API's URL and token come from ``--url``/``--token``, else ``GPUYARD_URL``/``GPUYARD_TOKEN``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import click
from rich.console import Console
from rich.table import Column, Table

from cli.render import health_text, queue_text, render_events, styled_state
from core.names import ARTIFACT_NAMES, MODEL_H5
from core.settings import get_settings
from core.states import CANCELLED, FAILED, INTERRUPTED, JOB_STATES, PRUNED, SUCCEEDED, TERMINAL_STATES
from service.client import Client, ClientError, Event

F = TypeVar("F", bound=Callable[..., Any])

# Exit codes of `gpuyard logs -f` and `gpuyard submit --follow`, by the job's final state.
FOLLOW_EXIT_CODES: dict[str, int] = {SUCCEEDED: 0, FAILED: 1, INTERRUPTED: 3, CANCELLED: 4, PRUNED: 5}
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

    return cast(F, wrapper)


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
@click.option(
    "--priority", type=int, default=0, show_default=True, help="Higher goes first; at most your max_priority."
)
@client_options
def submit(client: Client, spec_file: Path, dataset: str, dry_run: bool, follow: bool, priority: int) -> None:
    """Submit a job: SPEC.json (see examples/specs/) on a data set. Prints the job id on stdout."""
    try:
        spec = json.loads(spec_file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"{spec_file} is not valid JSON: {exc}", param_hint="SPEC.json") from None
    if not isinstance(spec, dict):
        raise click.BadParameter(f"expected a JSON object in {spec_file}", param_hint="SPEC.json")
    result = client.submit(dataset, spec, dry_run=dry_run, priority=priority)
    if dry_run:
        _print_dry_run(result)
        return
    click.echo(f"job {result['id']} {result['state']}", err=True)
    if result.get("waiting_reason"):
        click.echo("queue: " + queue_text(result), err=True)
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
    if result.get("memory"):
        console.print(result["memory"])
    placement = result.get("placement")
    if placement:
        where = (
            f"would start now on {placement['gpu']}" if placement.get("gpu") else "would wait: " + queue_text(placement)
        )
        console.print(where)


@click.command("status")
@click.argument("job", required=False)
@click.option("--state", type=click.Choice([state.value for state in JOB_STATES]), help="Only jobs in this state.")
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
        Column("id", no_wrap=True),
        Column("state", no_wrap=True),
        "family",
        "owner",
        "progress",
        "queued at",
        "queue / reason",
    )
    for item in jobs:
        table.add_row(
            item["id"],
            styled_state(item["state"]),
            str((item.get("spec") or {}).get("architecture", {}).get("family", "")),
            item["owner"],
            _progress_text(item.get("progress")),
            str(item["queued_at"])[:19].replace("T", " "),
            _queue_short(item) if item.get("waiting_reason") else item.get("error_reason") or "",
        )
    _console().print(table)


def _queue_short(job: dict[str, Any]) -> str:
    start = job.get("estimated_start_at")
    eta = f", ~{str(start)[11:16]}" if start else ""
    return f"#{job.get('queue_position')} {job['waiting_reason']}{eta}"


def _progress_text(progress: dict[str, Any] | None) -> str:
    if not progress:
        return ""
    parts = []
    if progress.get("epoch") is not None:
        parts.append(f"epoch {progress['epoch']}" + (f"/{progress['epochs']}" if progress.get("epochs") else ""))
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4g}")
    return ", ".join(parts)


def _memory_text(job: dict[str, Any]) -> str:
    fraction = ((job.get("spec") or {}).get("resources") or {}).get("memory_fraction")
    text = f"memory_fraction {fraction}" + (" (auto)" if job.get("memory_fraction_auto") else "")
    if job.get("peak_gpu_memory_bytes"):
        text += f", peak {job['peak_gpu_memory_bytes'] / 2**20:,.0f} MiB"
    if job.get("suggested_memory_fraction"):
        text += f", next time ask for {job['suggested_memory_fraction']:g}"
    return text


def _print_job(job: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    rows: list[tuple[str, str]] = [
        ("id", job["id"]),
        ("state", styled_state(job["state"])),
        ("owner", job["owner"]),
        ("dataset", job.get("dataset") or "(deleted)"),
        ("family", str((job.get("spec") or {}).get("architecture", {}).get("family", ""))),
        ("attempts", f"{job['attempts']}/{job['max_attempts']}"),
        ("gpu", job.get("gpu") or ""),
        ("queued at", str(job["queued_at"])),
        ("started", str(job.get("started_at") or "")),
        ("finished", str(job.get("finished_at") or "")),
        ("progress", _progress_text(job.get("progress"))),
        ("priority", str(job.get("priority", 0))),
        ("memory", _memory_text(job)),
    ]
    if job.get("waiting_reason"):
        rows.append(("queue", queue_text(job)))
    if job.get("preemptions"):
        rows.append(("preemptions", f"{job['preemptions']} (each resumed from its checkpoint; no attempt counted)"))
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


def follow_job(client: Client, job_id: str, console: Console | None = None) -> int:
    """Follow a job's events with live progress bars until its terminal event.

    Returns:
        The exit code for its final state (:data:`FOLLOW_EXIT_CODES`).
    """
    renderer = render_events(_event_dicts(client.events(job_id)), console or _console())
    state = renderer.final_state or client.job(job_id)["state"]
    if state not in TERMINAL_STATES:
        raise click.ClickException(f"the event stream of job {job_id} ended while it is {state}")
    return FOLLOW_EXIT_CODES[state]


def _event_dicts(events: Iterator[Event]) -> Iterator[dict[str, Any]]:
    """The SSE events' JSON bodies, named by their ``event:`` line; undecodable ones skipped."""
    for event in events:
        try:
            data = event.json()
        except ValueError:
            continue
        if isinstance(data, dict):
            yield {**data, "event": event.event}


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

"""Shows a job's JSON events (from the trainer's stdout or the API's SSE stream) as a live rich display."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from core.states import TERMINAL_STATES

TERMINAL_EVENTS = {"finished", "failed"}


def is_terminal(event: dict[str, Any]) -> bool:
    """True for the last event of a job: the trainer's finished/failed, or a final job state."""
    return event.get("event") in TERMINAL_EVENTS or (
        event.get("event") == "state" and event.get("state") in TERMINAL_STATES
    )


def _metrics_text(values: dict[str, Any] | None) -> str:
    if not values:
        return ""
    return "  ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, int | float))


def render_events(events: Iterable[dict[str, Any]], console: Console | None = None) -> dict[str, Any] | None:
    """Draw epoch and batch progress for ``events`` until a terminal one; return the last event seen.

    Args:
        events: decoded event dicts, in order (``started``, ``epoch_start``, ``batch``, ``epoch_end``, ...).
        console: where to draw; a new stderr console by default.

    Returns:
        The terminal event (``finished``/``failed``/final ``state``), or the last event if the stream ended early.
    """
    console = console or Console(stderr=True)
    last: dict[str, Any] | None = None
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        epochs_task = progress.add_task("epochs", total=None, info="")
        batch_task = progress.add_task("batches", total=None, info="", visible=False)
        for event in events:
            last = event
            kind = event.get("event")
            if kind == "started":
                progress.update(epochs_task, total=event.get("epochs"), completed=event.get("initial_epoch", 0))
                console.print(
                    f"started: {event.get('family', '')} on {event.get('device', '?')}, "
                    f"backend {event.get('backend', '?')}, {event.get('parameters', '?')} parameters"
                )
            elif kind == "epoch_start":
                progress.update(batch_task, completed=0, total=event.get("steps"), visible=True)
            elif kind == "batch":
                info = f"loss {event['loss']:.4g}" if isinstance(event.get("loss"), int | float) else ""
                if event.get("samples_per_s"):
                    info += f"  {event['samples_per_s']:.0f} samples/s"
                progress.update(batch_task, completed=event.get("step", 0), total=event.get("steps"), info=info)
            elif kind == "epoch_end":
                metrics = {"loss": event.get("loss"), **(event.get("metrics") or {})}
                progress.update(epochs_task, completed=event.get("epoch", 0), info=_metrics_text(metrics))
                progress.update(batch_task, visible=False)
            elif kind == "state" and event.get("state") not in TERMINAL_STATES:
                attempt = f" (attempt {event['attempt']})" if "attempt" in event else ""
                console.print(f"job {event.get('state')}{attempt}")
            if is_terminal(event):
                break
    if last is not None and last.get("event") == "failed":
        console.print(f"[red]failed: {last.get('reason')}: {last.get('detail', '')}")
    return last

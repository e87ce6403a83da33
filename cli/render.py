"""The one renderer of a job's events (the trainer's JSON lines, or the API's SSE stream): live progress
bars for the epochs and the batches of the current epoch, one line per finished epoch, the final state.

Used by ``gpuyard logs -f`` / ``submit --follow`` (events from the API) and ``gpuyard demo`` (events
straight from a trainer's stdout).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from core.states import FAILED, INTERRUPTED, RUNNING, SUCCEEDED, TERMINAL_STATES


def styled_state(state: str) -> str:
    colours: dict[str, str] = {SUCCEEDED: "green", FAILED: "red", INTERRUPTED: "yellow", RUNNING: "cyan"}
    colour = colours.get(state)
    return f"[{colour}]{state}[/]" if colour else state


class EventRenderer:
    """Renders a job's events: a progress bar per epoch and per batch, one line per finished epoch."""

    def __init__(self, console: Console, progress: Progress) -> None:
        self.console = console
        self.progress = progress
        self.epochs: TaskID | None = None
        self.batches: TaskID | None = None
        self.final_state: str | None = None
        self.last: dict[str, Any] | None = None

    def handle(self, data: dict[str, Any]) -> None:
        """Draw one event (a dict with its name in ``event``); unknown events are skipped."""
        if not isinstance(data, dict):
            return
        self.last = data
        handler = getattr(self, "on_" + str(data.get("event")), None)
        if handler is not None:
            handler(data)

    def _fields(self, data: dict[str, Any]) -> dict[str, Any]:
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
            self.console.print(f"job {styled_state(state)}{reason}{detail}")
        elif state == RUNNING:
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

    def on_queue(self, data: dict[str, Any]) -> None:
        self.console.print("queue: " + queue_text(data))

    def on_resized(self, data: dict[str, Any]) -> None:
        self.console.print(
            f"memory: out of its budget at memory_fraction {data.get('memory_fraction_from')}; requeued once at "
            f"{data.get('memory_fraction')}"
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


def health_text(finding: dict[str, Any]) -> str:
    """One health finding for a terminal: kind and epoch, what was measured, then the remedy."""
    epoch = finding.get("epoch")
    when = f" at epoch {epoch}" if epoch is not None else " (predicted)"
    return (
        f"[yellow]{finding.get('kind', '?')}[/]{when}: {finding.get('detail', '')}\n"
        f"  remedy: {finding.get('remedy', '')}"
    )


def render_events(events: Iterable[dict[str, Any]], console: Console | None = None) -> EventRenderer:
    """Draw ``events`` (decoded event dicts, in order) until they end; return the renderer, whose
    ``final_state`` is the job's terminal state when the events carried one and ``last`` the last event."""
    console = console or Console(highlight=False, soft_wrap=True)
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
    renderer = EventRenderer(console, progress)
    with progress:
        for event in events:
            renderer.handle(event)
    return renderer


def queue_text(waiting: dict[str, Any]) -> str:
    """Where a waiting job stands, from a job record or a ``queue`` event: "#2, gpu_full, starts ~14:05 (…)"."""
    parts = []
    if waiting.get("queue_position") is not None:
        parts.append(f"#{waiting['queue_position']}")
    if waiting.get("waiting_reason"):
        parts.append(str(waiting["waiting_reason"]))
    start = waiting.get("estimated_start_at")
    parts.append(f"starts ~{str(start)[:16].replace('T', ' ')} UTC" if start else "start unknown")
    note = waiting.get("detail") or waiting.get("dispatch_note")
    return ", ".join(parts) + (f" ({note})" if note else "")

"""The trainer's JSON-lines emitter."""

from __future__ import annotations

import io
import json
import math

import numpy as np

from worker.trainer.events import EventEmitter, jsonable


def test_each_event_is_one_json_line_with_event_and_time() -> None:
    stream = io.StringIO()
    emitter = EventEmitter(stream)
    emitter.emit("started", rows=np.int64(3), loss=np.float32(0.5), shape=np.array([2, 3]))
    emitter.emit("epoch_end", loss=float("nan"), metrics={"val_loss": math.inf})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "started" and isinstance(first["time"], float)
    assert first["rows"] == 3 and first["loss"] == 0.5 and first["shape"] == [2, 3]
    assert second["loss"] is None and second["metrics"] == {"val_loss": None}  # strict JSON, no NaN


def test_batch_events_are_rate_limited() -> None:
    now = [0.0]
    stream = io.StringIO()
    emitter = EventEmitter(stream, min_batch_interval_s=0.5, clock=lambda: now[0])
    sent = []
    for step in range(100):  # 100 batches in 1 s
        now[0] = step * 0.01
        sent.append(emitter.batch(step=step) is not None)
    assert sum(sent) == 2  # at t=0 and t=0.5
    assert emitter.counts == {"batch": 2}
    emitter.emit("epoch_end")  # other events are never dropped
    assert emitter.counts["epoch_end"] == 1


def test_jsonable_handles_unknowns() -> None:
    assert jsonable({1: object}) == {"1": str(object)}
    assert jsonable((1, 2.5)) == [1, 2.5]

"""TensorBoard logs of a job, written with tensorboardX (any Keras backend, no TensorFlow needed).

One callback, fed by the records the trainer already keeps (no second gradient computation):

* every epoch (step = the epoch number, 0 = before training): ``epoch/<log>`` for each Keras log
  (``loss``, ``val_loss``, metrics), ``speed/samples_per_s`` from the ``epoch_end`` record, and — when the
  epoch has a diagnostics record — ``gradients/first_last_ratio`` (first / last hidden block's gradient
  norm, as the health rules read it), ``gradients/<layer>`` (each layer's gradient norm),
  ``probe/loss`` and ``activations/<block>/mean|std|dead_share``;
* every ``GPUYARD_TENSORBOARD_HISTOGRAM_EVERY`` epochs (and at step 0 and the last epoch): histograms of
  every weight (``weights/<variable path>``) and of each block's output on the probe batch
  (``activations/<block>``). Only these need a forward pass of their own, on the fixed probe rows.

The event files live in ``<out>/tensorboard/`` while the job trains and are zipped atomically into
``tensorboard.zip`` when an attempt ends (finished or stopped). A resumed attempt first cuts every event
past the checkpoint's epoch out of the older files (:func:`truncate_events`), then appends in a new file:
each step appears once, whatever the attempt that logged it.
"""

from __future__ import annotations

import math
import os
import struct
import sys
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
from tensorboardX import SummaryWriter
from tensorboardX.proto.event_pb2 import Event

from core.atomicio import atomic_path
from models.health import hidden_blocks
from worker.trainer.diagnostics import Diagnostics

_HEADER = struct.Struct("<Q")  # a TFRecord: length (u64), its masked crc32c (u32), data, the data's crc (u32)


def first_last_ratio(record: Mapping[str, Any]) -> float | None:
    """The first hidden block's gradient norm over the last one's (what the vanishing/exploding rules read)."""
    hidden = hidden_blocks(record)
    if len(hidden) < 2:
        return None
    first, last = hidden[0][1].get("gradient_norm"), hidden[-1][1].get("gradient_norm")
    if first is None or not last:
        return None
    return float(first) / float(last)


def _frames(path: Path) -> Iterator[tuple[bytes, bytes]]:
    """Each TFRecord of an event file as (its raw bytes, its payload); stops at a torn last record."""
    data = path.read_bytes()
    offset = 0
    while offset + _HEADER.size + 4 <= len(data):
        (length,) = _HEADER.unpack_from(data, offset)
        end = offset + _HEADER.size + 4 + length + 4
        if end > len(data):
            return  # a record cut short by a kill: nothing after it is readable either
        yield data[offset:end], data[offset + _HEADER.size + 4 : end - 4]
        offset = end


def truncate_events(logdir: Path, last_step: int) -> int:
    """Drop every event with a step above ``last_step`` from the event files in ``logdir`` (atomically).

    Returns:
        How many events were dropped.
    """
    dropped = 0
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        kept: list[bytes] = []
        for raw, payload in _frames(path):
            if Event.FromString(payload).step > last_step:
                dropped += 1
            else:
                kept.append(raw)
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"".join(kept))
    return dropped


def zip_logs(logdir: Path, target: Path) -> Path:
    """Zip ``logdir``'s files into ``target`` (paths relative to ``logdir``), atomically."""
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(logdir.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                archive.write(path, path.relative_to(logdir).as_posix())
    return target


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class TensorBoardLogger(keras.callbacks.Callback):
    """Writes a job's TensorBoard logs at each epoch end, from the trainer's own per-epoch records.

    Runs after the diagnostics recorder (it reads ``records[-1]``) and before the checkpoint writer.

    Args:
        logdir: the job's ``tensorboard/`` folder.
        diagnostics: the trainer's probe (its model, blocks and probe rows give the activation histograms).
        records: the diagnostics records, latest last (an epoch without one gets no gradient scalars).
        epoch_records: the ``epoch_end`` records (``samples_per_s``).
        epochs: the spec's epoch count (the last epoch always gets histograms).
        histogram_every: epochs between histograms; 0: none.
        resumed_from: the checkpoint's epoch when resuming; later events of earlier attempts are dropped.
    """

    def __init__(
        self,
        logdir: Path,
        diagnostics: Diagnostics,
        records: Sequence[dict[str, Any]],
        epoch_records: Sequence[dict[str, Any]],
        *,
        epochs: int,
        histogram_every: int,
        resumed_from: int | None = None,
    ) -> None:
        super().__init__()
        self.logdir = logdir
        self.diagnostics = diagnostics
        self.records = records
        self.epoch_records = epoch_records
        self.epochs = epochs
        self.histogram_every = histogram_every
        self._extractor: keras.Model | None = None
        self._extractor_failed = False
        logdir.mkdir(parents=True, exist_ok=True)
        if resumed_from is None:
            for path in logdir.glob("events.out.tfevents.*"):  # a fresh start: nothing of an older run stays
                path.unlink()
        else:
            truncate_events(logdir, resumed_from)
        # One file per attempt: an attempt never appends to another's file.
        self.writer = SummaryWriter(
            str(logdir), flush_secs=30, filename_suffix=f".{os.getpid()}.from{resumed_from or 0}"
        )

    def log_initial(self) -> None:
        """Step 0: the diagnostics before the first step, and the first histograms."""
        if self.records and self.records[-1].get("epoch") == 0:
            self._log_record(self.records[-1], 0)
        self._histograms(0)
        self.writer.flush()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        step = epoch + 1
        for key, value in (logs or {}).items():
            number = _finite(value)
            if number is not None:
                self.writer.add_scalar(f"epoch/{key}", number, step)
        if self.epoch_records and self.epoch_records[-1].get("epoch") == step:
            rate = _finite(self.epoch_records[-1].get("samples_per_s"))
            if rate is not None:
                self.writer.add_scalar("speed/samples_per_s", rate, step)
        if self.records and self.records[-1].get("epoch") == step:
            self._log_record(self.records[-1], step)
        if self.histogram_every and (step % self.histogram_every == 0 or step == self.epochs):
            self._histograms(step)
        self.writer.flush()  # what the checkpoint after this callback covers is on disk

    def _log_record(self, record: Mapping[str, Any], step: int) -> None:
        ratio = first_last_ratio(record)
        if ratio is not None:
            self.writer.add_scalar("gradients/first_last_ratio", ratio, step)
        probe_loss = _finite(record.get("probe_loss"))
        if probe_loss is not None:
            self.writer.add_scalar("probe/loss", probe_loss, step)
        for layer, norm in (record.get("gradient_norms") or {}).items():
            if _finite(norm) is not None:
                self.writer.add_scalar(f"gradients/{layer}", float(norm), step)
        for block, entry in (record.get("blocks") or {}).items():
            for key in ("activation_mean", "activation_std", "dead_share"):
                value = _finite(entry.get(key))
                if value is not None:
                    self.writer.add_scalar(f"activations/{block}/{key.removeprefix('activation_')}", value, step)

    def _histograms(self, step: int) -> None:
        if not self.histogram_every:
            return
        model = self.diagnostics.model
        for variable in model.weights:
            values = np.asarray(keras.ops.convert_to_numpy(variable.value))
            if values.size and np.issubdtype(values.dtype, np.floating) and np.isfinite(values).all():
                self.writer.add_histogram(f"weights/{variable.path}", values, step)
        extractor = self._block_extractor()
        if extractor is None:
            return
        outputs = extractor.predict_on_batch(self.diagnostics.x)
        outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
        for block, values in zip(self.diagnostics.blocks, outputs, strict=True):
            array = np.asarray(values, dtype=np.float64)
            if array.size and np.isfinite(array).all():
                self.writer.add_histogram(f"activations/{block}", array, step)

    def _block_extractor(self) -> keras.Model | None:
        """A model returning each block's output (its last layer in the model's order), built once."""
        if self._extractor is None and not self._extractor_failed:
            model = self.diagnostics.model
            position = {layer.name: i for i, layer in enumerate(model.layers)}
            try:
                outputs = [
                    model.get_layer(max(members, key=lambda n: position[n])).output
                    for members in self.diagnostics.blocks.values()
                ]
                inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
                self._extractor = keras.Model(inputs, outputs)
            except (AttributeError, ValueError, TypeError, KeyError):
                self._extractor_failed = True  # weights still get histograms; activations need a functional model
        return self._extractor

    def close(self, archive: Path) -> Path | None:
        """Flush and close the event files, then zip them into ``archive``; None when that failed.

        The logs are a by-product: a failure here (a full disk) is said on stderr and never fails the job
        nor hides the error a failing attempt is ending with.
        """
        try:
            self.writer.close()
            return zip_logs(self.logdir, archive)
        except OSError as exc:
            print(f"gpuyard trainer: no {archive.name}: {exc}", file=sys.stderr)
            return None

"""Training data from a checked HDF5 data set: in-memory arrays, or batches streamed from the file.

:func:`open_training_data` takes the file and its :class:`~models.data.summary.DatasetSummary` (from the
sandboxed check) and returns a :class:`TrainingData`. Its ``train`` is an ``EpochBatches``, a
``keras.utils.PyDataset`` whose batch order is a pure function of ``(seed, epoch)``:

* data up to ``in_memory_limit_bytes`` is loaded once and each epoch is a full permutation of the rows;
* larger data stays in the file and each epoch is a permutation of contiguous batch-sized row slices,
  read one batch at a time, so a set larger than memory trains in bounded memory.

The trainer calls ``train.set_epoch(epoch)`` from a callback's ``on_epoch_begin`` and fits with
``shuffle=False`` (Keras would otherwise shuffle the batch indices itself, with Python's unseeded
``random``). With Keras 3.15 on the TensorFlow and JAX backends no batch of epoch *e* is requested
before ``on_epoch_begin(e)`` (tf.data starts prefetching at the first ``GetNext``, inside the epoch), so a
run resumed with ``initial_epoch=k`` sees exactly the batches of an uninterrupted run; the tests check it.

The h5py file is opened lazily, in the process that reads it, and never before a fork. Keras is imported
only when an ``EpochBatches`` is first built.
"""

from __future__ import annotations

import math
import os
from functools import cache
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from core.errors import DataError, Problem
from models.data.summary import DatasetSummary

#: Validation/test splits of a streamed data set are loaded in memory up to this share of the limit.
EVAL_IN_MEMORY_SHARE = 0.25
#: Rows per slice when loading arrays or computing statistics, in bytes of float32 input.
LOAD_SLICE_BYTES = 16 * 2**20

Batch = tuple[np.ndarray, np.ndarray]


class _Store:
    """An HDF5 file opened lazily in the process that reads it (h5py handles must not cross a fork)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: h5py.File | None = None
        self._pid: int | None = None

    def dataset(self, key: str) -> h5py.Dataset:
        if self._file is None or self._pid != os.getpid():
            # A handle inherited through fork is dropped unclosed: closing it could touch the parent's state.
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file[key]

    def read(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of ``key``: the only place data is read from the file."""
        rows: np.ndarray = self.dataset(key)[start:stop]
        return rows

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
        self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_file": None, "_pid": None}


class _Split:
    """Rows ``[start, stop)`` of one split's X and Y, in memory or in a store."""

    def __init__(
        self,
        store: _Store,
        x_key: str,
        y_key: str,
        start: int,
        stop: int,
        target: str,
        arrays: Batch | None = None,
    ) -> None:
        self.store = store
        self.x_key = x_key
        self.y_key = y_key
        self.start = start
        self.stop = stop
        self.target = target
        self.arrays = arrays

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def read(self, start: int, stop: int) -> Batch:
        """Rows ``[start, stop)`` counted within the split, converted for training."""
        if self.arrays is not None:
            return self.arrays[0][start:stop], self.arrays[1][start:stop]
        a, b = self.start + start, self.start + stop
        return _as_x(self.store.read(self.x_key, a, b)), _as_y(self.store.read(self.y_key, a, b), self.target)

    def take(self, rows: np.ndarray) -> Batch:
        """The rows at ``rows`` (in-memory splits only)."""
        assert self.arrays is not None
        return self.arrays[0][rows], self.arrays[1][rows]

    def load(self) -> _Split:
        """This split with its arrays in memory, read in bounded slices."""
        if self.arrays is not None:
            return self
        x_row = self.store.dataset(self.x_key).shape[1:]
        y_row = _y_row_shape(self.store.dataset(self.y_key).shape, self.target)
        x = np.empty((self.rows, *x_row), np.float32)
        y = np.empty((self.rows, *y_row), np.int64 if self.target == "integer_labels" else np.float32)
        for a, b in _row_slices(self.rows, _row_bytes(x_row)):
            x[a:b], y[a:b] = self.read(a, b)
        return _Split(self.store, self.x_key, self.y_key, self.start, self.stop, self.target, (x, y))

    def bytes(self, x_row_shape: list[int], y_row_bytes: int) -> int:
        return self.rows * (_row_bytes(tuple(x_row_shape)) + y_row_bytes)


class _Batches:
    """The batch logic of ``EpochBatches``, free of Keras (see :func:`epoch_batches_class`)."""

    def __init__(self, split: _Split, *, batch_size: int, seed: int, shuffle: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.split = split
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = 0
        self._order = self.order(0)

    @property
    def streamed(self) -> bool:
        """True when batches are read from the file, False when they come from memory."""
        return self.split.arrays is None

    @property
    def epoch(self) -> int:
        return self._epoch

    def __len__(self) -> int:
        return math.ceil(self.split.rows / self.batch_size)

    @property
    def num_batches(self) -> int:
        return len(self)

    def set_epoch(self, epoch: int) -> None:
        """Make the next batches those of ``epoch``: call it from ``on_epoch_begin``."""
        if epoch < 0:
            raise ValueError(f"Expected an epoch ≥ 0. Received: epoch={epoch}")
        self._epoch = epoch
        self._order = self.order(epoch)

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's order: row indices (in memory) or batch indices (streamed), from ``(seed, epoch)``."""
        count = self.split.rows if not self.streamed else len(self)
        if not self.shuffle:
            return np.arange(count)
        return np.random.default_rng([self.seed, epoch]).permutation(count)

    def __getitem__(self, index: int) -> Batch:
        if not 0 <= index < len(self):
            raise IndexError(f"Expected a batch index in [0, {len(self)}). Received: index={index}")
        if self.streamed:
            start = int(self._order[index]) * self.batch_size
            return self.split.read(start, min(start + self.batch_size, self.split.rows))
        if not self.shuffle:
            start = index * self.batch_size
            return self.split.read(start, min(start + self.batch_size, self.split.rows))
        return self.split.take(self._order[index * self.batch_size : (index + 1) * self.batch_size])

    def on_epoch_end(self) -> None:
        """Nothing: the order changes only through :meth:`set_epoch`, so a resumed run matches."""


@cache
def epoch_batches_class() -> type:
    """``EpochBatches``: :class:`_Batches` as a ``keras.utils.PyDataset`` (imports Keras on first use)."""
    import keras  # only when a set streams from HDF5: in-memory sets need no Keras here

    return type(
        "EpochBatches",
        (_Batches, keras.utils.PyDataset),
        {
            "__doc__": "Batches of one split for ``model.fit``; each epoch's order depends on (seed, epoch).",
            "__module__": __name__,
        },
    )


def __getattr__(name: str) -> Any:
    if name == "EpochBatches":
        return epoch_batches_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class TrainingData:
    """The splits of one data set, ready for ``model.fit`` / ``evaluate``.

    Attributes:
        train: ``EpochBatches`` over the training rows.
        validation: None, ``(x, y)`` arrays, or a non-shuffled ``EpochBatches`` when too large for memory.
        test: same forms as ``validation``.
        rows: rows per split (``train``, and ``val``/``test`` where present).
        streamed: whether training batches are read from the file.
    """

    def __init__(
        self,
        train: Any,
        validation: Batch | Any | None,
        test: Batch | Any | None,
        rows: dict[str, int],
        store: _Store,
    ) -> None:
        self.train = train
        self.validation = validation
        self.test = test
        self.rows = rows
        self._store = store
        self._stats: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def streamed(self) -> bool:
        return bool(self.train.streamed)

    def probe(self, n: int) -> Batch:
        """The first ``n`` training rows (fewer if the split is smaller), always the same: for diagnostics."""
        if n <= 0:
            raise ValueError(f"Expected a positive number of probe rows. Received: n={n}")
        split: _Split = self.train.split
        return split.read(0, min(n, split.rows))

    def input_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature mean and (population) variance of X over the training rows, as float32.

        Computed once, in bounded slices with float64 accumulators (Chan's parallel update).
        """
        if self._stats is None:
            split: _Split = self.train.split
            x_row = self._x_row_shape(split)
            count = 0
            mean = np.zeros(x_row, np.float64)
            m2 = np.zeros(x_row, np.float64)
            for a, b in _row_slices(split.rows, _row_bytes(x_row)):
                block = split.read(a, b)[0].astype(np.float64)
                n_b = len(block)
                mean_b = block.mean(axis=0)
                m2_b = ((block - mean_b) ** 2).sum(axis=0)
                delta = mean_b - mean
                total = count + n_b
                mean = mean + delta * (n_b / total)
                m2 = m2 + m2_b + delta**2 * (count * n_b / total)
                count = total
            self._stats = (mean.astype(np.float32), (m2 / max(count, 1)).astype(np.float32))
        return self._stats

    def _x_row_shape(self, split: _Split) -> tuple[int, ...]:
        if split.arrays is not None:
            return tuple(split.arrays[0].shape[1:])
        return tuple(self._store.dataset(split.x_key).shape[1:])

    def close(self) -> None:
        """Close the HDF5 file if this process opened it."""
        self._store.close()

    def __enter__(self) -> TrainingData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_training_data(
    path: str | os.PathLike[str],
    summary: DatasetSummary,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    validation_split: float = 0.0,
    in_memory_limit_bytes: int,
) -> TrainingData:
    """Open a checked data set for training.

    Args:
        path: the HDF5 file the summary describes.
        summary: the result of the sandboxed check (keys, rows, target kind).
        batch_size: rows per training batch.
        seed: seed of the per-epoch order (≥ 0).
        shuffle: shuffle the training order each epoch (rows in memory, batch slices when streamed).
        validation_split: when the file has no validation split, the share of the *last* training rows
            held out for validation (excluded from training); ignored when ``X_val`` exists.
        in_memory_limit_bytes: data up to this many bytes (as float32 X and the training dtype of Y)
            is loaded into memory; larger data is streamed from the file.

    Returns:
        The training, validation and test data.

    Raises:
        ValueError: ``batch_size``, ``seed`` or ``validation_split`` out of range.
        DataError: ``validation_split`` leaves no training or no validation rows.
    """
    _check_arguments(batch_size=batch_size, seed=seed, validation_split=validation_split)
    store = _Store(Path(path))
    target = summary.target
    train, val, test = _splits(store, summary, validation_split)

    y_row_bytes = _row_bytes(
        _y_row_shape((1, summary.output_dim), target), itemsize=8 if target == "integer_labels" else 4
    )
    splits = [s for s in (train, val, test) if s is not None]
    total = sum(s.bytes(summary.input_shape, y_row_bytes) for s in splits)
    batches = epoch_batches_class()

    def evaluation(split: _Split | None, in_memory: bool) -> Batch | Any | None:
        if split is None:
            return None
        if (
            in_memory
            or split.bytes(summary.input_shape, y_row_bytes) <= in_memory_limit_bytes * EVAL_IN_MEMORY_SHARE
        ):
            loaded = split.load()
            assert loaded.arrays is not None
            return loaded.arrays
        return batches(split, batch_size=batch_size, seed=seed, shuffle=False)

    in_memory = total <= in_memory_limit_bytes
    try:
        if in_memory:
            train = train.load()
        validation = evaluation(val, in_memory)
        test_data = evaluation(test, in_memory)
    except OSError as exc:
        store.close()
        file = Path(path)
        raise DataError(
            # The file's name only: the detail reaches the job's owner, who must not learn server paths.
            [Problem("read_error", f"reading {file.name} failed ({_without(file, exc)}); expected the checked file")]
        ) from exc
    if in_memory:
        store.close()  # everything is loaded: no handle stays open in a process that may fork later
    rows = {"train": train.rows} | ({"val": val.rows} if val else {}) | ({"test": test.rows} if test else {})
    train_batches = batches(train, batch_size=batch_size, seed=seed, shuffle=shuffle)
    return TrainingData(train_batches, validation, test_data, rows, store)


def _check_arguments(*, batch_size: int, seed: int, validation_split: float) -> None:
    """Raise ``ValueError`` for a ``batch_size``, ``seed`` or ``validation_split`` out of range."""
    if batch_size < 1:
        raise ValueError(f"Expected batch_size ≥ 1. Received: batch_size={batch_size}")
    if seed < 0:
        raise ValueError(f"Expected seed ≥ 0. Received: seed={seed}")
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(
            f"Expected validation_split in [0, 1). Received: validation_split={validation_split}"
        )


def _splits(
    store: _Store, summary: DatasetSummary, validation_split: float
) -> tuple[_Split, _Split | None, _Split | None]:
    """The training, validation and test splits; the validation rows held out of training when asked.

    Raises:
        DataError: ``validation_split`` leaves no training or no validation rows.
    """
    keys = summary.keys
    target = summary.target
    n_train = summary.rows["train"]
    val: _Split | None = None
    if summary.has("val"):
        val = _Split(store, keys.x_val, keys.y_val, 0, summary.rows["val"], target)
    elif validation_split > 0:
        n_val = int(n_train * validation_split)
        if n_val < 1 or n_val >= n_train:
            raise DataError(
                [
                    Problem(
                        "bad_validation_split",
                        f"validation_split={validation_split} of {n_train} training rows leaves {n_val} "
                        f"validation and {n_train - n_val} training rows; expected at least one of each",
                        field="validation_split",
                    )
                ]
            )
        val = _Split(store, keys.x_train, keys.y_train, n_train - n_val, n_train, target)
        n_train -= n_val
    train = _Split(store, keys.x_train, keys.y_train, 0, n_train, target)
    test = (
        _Split(store, keys.x_test, keys.y_test, 0, summary.rows["test"], target)
        if summary.has("test")
        else None
    )
    return train, val, test


# ----------------------------------------------------------------------------------------------- helpers


def _as_x(block: np.ndarray) -> np.ndarray:
    return block.astype(np.float32, copy=False)


def _as_y(block: np.ndarray, target: str) -> np.ndarray:
    if target == "integer_labels":
        return block.reshape(len(block)).astype(np.int64, copy=False)
    block = block.astype(np.float32, copy=False)
    return block.reshape(len(block), 1) if block.ndim == 1 else block


def _y_row_shape(shape: tuple[int, ...], target: str) -> tuple[int, ...]:
    if target == "integer_labels":
        return ()
    return (1,) if len(shape) == 1 else tuple(shape[1:])


def _row_bytes(row_shape: tuple[int, ...], itemsize: int = 4) -> int:
    return max(1, math.prod(row_shape) * itemsize)


def _row_slices(rows: int, row_bytes: int) -> list[tuple[int, int]]:
    step = max(1, LOAD_SLICE_BYTES // row_bytes)
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _without(path: Path, exc: BaseException) -> str:
    """``exc``'s text with ``path`` cut to its name (h5py's messages repeat the full path)."""
    return str(exc).replace(str(path), path.name)

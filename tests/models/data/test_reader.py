"""The training-data reader: deterministic epochs, streaming in bounded reads, and resumable fits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hostile import write_good

from models.data import reader as reader_module
from models.data.inspect import inspect_file
from models.data.reader import TrainingData, open_training_data

ROWS = 100
BATCH = 8


def _numbered(tmp_path: Path, **overrides: object) -> Path:
    """X row i is (i, i, i, i) so that a batch tells which rows it holds."""
    x = np.repeat(np.arange(ROWS, dtype=np.float32)[:, None], 4, axis=1)
    return write_good(tmp_path / "numbered.h5", X_train=x, Y_train=np.arange(ROWS) % 3, **overrides)


def _open(path: Path, *, streamed: bool, seed: int = 7, **kwargs: object) -> TrainingData:
    limit = 1 if streamed else 2**30
    data = open_training_data(
        path, inspect_file(path), batch_size=BATCH, seed=seed, in_memory_limit_bytes=limit, **kwargs
    )
    assert data.streamed is streamed
    return data


def _epoch_rows(data: TrainingData, epoch: int) -> list[list[int]]:
    data.train.set_epoch(epoch)
    return [batch[0][:, 0].astype(int).tolist() for batch in (data.train[i] for i in range(len(data.train)))]


@pytest.mark.parametrize("streamed", [False, True], ids=["in_memory", "streamed"])
def test_epoch_order_depends_only_on_seed_and_epoch(tmp_path: Path, streamed: bool) -> None:
    path = _numbered(tmp_path)
    a, b = _open(path, streamed=streamed), _open(path, streamed=streamed)
    other_seed = _open(path, streamed=streamed, seed=8)
    assert len(a.train) == 13
    first, second = _epoch_rows(a, 0), _epoch_rows(a, 1)
    assert first != second
    assert _epoch_rows(b, 1) == second and _epoch_rows(b, 0) == first  # set_epoch(k) reproduces epoch k
    assert _epoch_rows(other_seed, 0) != first
    for epoch_rows in (first, second):
        flat = [row for batch in epoch_rows for row in batch]
        assert sorted(flat) == list(range(ROWS))  # every row exactly once per epoch


def test_streamed_epochs_permute_contiguous_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[tuple[str, int, int]] = []
    original = reader_module._Store.read

    def recording(self, key, start, stop):  # type: ignore[no-untyped-def]
        reads.append((key, start, stop))
        return original(self, key, start, stop)

    monkeypatch.setattr(reader_module._Store, "read", recording)
    data = _open(_numbered(tmp_path), streamed=True)
    reads.clear()
    batches = _epoch_rows(data, 3)
    assert all(stop - start <= BATCH for _, start, stop in reads)  # never more than a batch in memory
    assert sorted(start for key, start, _ in reads if key == "X_train") == list(range(0, ROWS, BATCH))
    assert all(rows == list(range(rows[0], rows[0] + len(rows))) for rows in batches)
    assert [b[0] for b in batches] != sorted(b[0] for b in batches)  # shuffled by slice


def test_in_memory_and_streamed_hold_the_same_data(tmp_path: Path) -> None:
    path = _numbered(tmp_path)
    memory, streamed = _open(path, streamed=False), _open(path, streamed=True)
    for data in (memory, streamed):
        x, y = data.train[0]
        assert x.dtype == np.float32 and y.dtype == np.int64 and y.shape == (len(x),)
        assert np.array_equal(y, x[:, 0].astype(int) % 3)
    assert np.array_equal(memory.probe(5)[0], streamed.probe(5)[0])
    assert memory.probe(5)[0][:, 0].tolist() == [0, 1, 2, 3, 4]
    x_all = np.repeat(np.arange(ROWS, dtype=np.float64)[:, None], 4, axis=1)
    for data in (memory, streamed):
        mean, variance = data.input_stats()
        np.testing.assert_allclose(mean, x_all.mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(variance, x_all.var(axis=0), rtol=1e-5)
        data.close()


@pytest.mark.parametrize("streamed", [False, True], ids=["in_memory", "streamed"])
def test_validation_split_holds_out_the_last_rows(tmp_path: Path, streamed: bool) -> None:
    data = _open(_numbered(tmp_path), streamed=streamed, validation_split=0.2)
    assert data.rows == {"train": 80, "val": 20, "test": 12}
    seen = {row for batch in _epoch_rows(data, 0) for row in batch}
    assert seen == set(range(80))
    validation = data.validation
    x_val = validation[0] if isinstance(validation, tuple) else np.concatenate([b[0] for b in validation])
    assert x_val[:, 0].tolist() == list(range(80, 100))


def test_file_validation_split_is_used(tmp_path: Path) -> None:
    data = _open(write_good(tmp_path / "v.h5", val=True), streamed=False, validation_split=0.5)
    assert data.rows == {"train": 40, "val": 10, "test": 12}
    assert isinstance(data.validation, tuple) and data.validation[0].shape == (10, 4)


def _fit_log(data: TrainingData, *, initial_epoch: int, epochs: int) -> list[tuple]:
    """Fit a tiny model; log every batch read with the epoch set when it was read."""
    import keras

    log: list[tuple] = []
    batches_type = type(data.train)
    original = batches_type.__getitem__

    def recording(self, index):  # type: ignore[no-untyped-def]
        x, y = original(self, index)
        if self is data.train:  # validation batches come from another instance of the same class
            log.append(("get", self.epoch, tuple(x[:, 0].astype(int))))
        return x, y

    class SetEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):  # type: ignore[no-untyped-def]
            data.train.set_epoch(epoch)
            log.append(("begin", epoch))

    batches_type.__getitem__ = recording
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
        model.compile("sgd", "sparse_categorical_crossentropy")
        model.fit(
            data.train,
            epochs=epochs,
            initial_epoch=initial_epoch,
            shuffle=False,
            verbose=0,
            callbacks=[SetEpoch()],
            validation_data=data.validation,
        )
    finally:
        batches_type.__getitem__ = original
    return log


def _by_epoch(log: list[tuple]) -> dict[int, list[tuple]]:
    """Batches per epoch, checking that none was read before its epoch began (no prefetch across epochs)."""
    current, seen = None, {}
    for event in log:
        if event[0] == "begin":
            current = event[1]
            seen[current] = []
        elif current is not None:
            assert event[1] == current, f"a batch of epoch {event[1]} was read during epoch {current}"
            seen[current].append(event[2])
    return seen


def test_resumed_fit_sees_the_batches_of_an_uninterrupted_fit(tmp_path: Path) -> None:
    path = _numbered(tmp_path)
    whole = _by_epoch(_fit_log(_open(path, streamed=True, validation_split=0.1), initial_epoch=0, epochs=4))
    resumed = _by_epoch(_fit_log(_open(path, streamed=True, validation_split=0.1), initial_epoch=2, epochs=4))
    assert sorted(resumed) == [2, 3]
    assert resumed[2] == whole[2] and resumed[3] == whole[3]
    assert whole[0] != whole[1]


@pytest.mark.slow
def test_no_prefetch_across_epochs_on_jax(tmp_path: Path) -> None:
    pytest.importorskip("jax")
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])\n"
        "from pathlib import Path\n"
        "import test_reader as t\n"
        "path = t._numbered(Path(sys.argv[3]))\n"
        "t._by_epoch(t._fit_log(t._open(path, streamed=True), initial_epoch=1, epochs=3))\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[3]
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", script, str(root), str(Path(__file__).parent), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]

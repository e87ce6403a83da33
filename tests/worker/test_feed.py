"""The trainer's input path: in-memory data on TensorFlow goes through tf.data, in the reader's order."""

from __future__ import annotations

from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from models.data.inspect import inspect_file
from models.data.reader import TrainingData, open_training_data
from worker.trainer import feed
from worker.trainer.callbacks import EpochSetter

ROWS, BATCH = 100, 8
pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the tf.data path is TensorFlow's")


def _numbered(tmp_path: Path) -> Path:
    """X row i is (i, i, i, i), so a batch tells which rows it holds."""
    path = tmp_path / "numbered.h5"
    with h5py.File(path, "w") as f:
        f["X_train"] = np.repeat(np.arange(ROWS, dtype=np.float32)[:, None], 4, axis=1)
        f["Y_train"] = np.arange(ROWS) % 3
    return path


def _open(path: Path, *, streamed: bool = False) -> TrainingData:
    return open_training_data(
        path, inspect_file(path), batch_size=BATCH, seed=7, in_memory_limit_bytes=1 if streamed else 2**30
    )


def _rows(batch: tuple) -> list[int]:
    return np.asarray(batch[0])[:, 0].astype(int).tolist()


def test_the_input_path_follows_memory_and_backend(tmp_path: Path) -> None:
    path = _numbered(tmp_path)
    memory, streamed = _open(path), _open(path, streamed=True)
    assert feed.input_path(memory.train) == feed.TENSORS
    assert feed.fit_input(streamed.train) is streamed.train
    assert feed.input_path(streamed.train) == feed.PYDATASET_STREAMED
    assert feed.input_path(memory.train, "jax") == feed.PYDATASET_MEMORY


def test_tensor_batches_are_the_reader_batches_of_each_epoch(tmp_path: Path) -> None:
    data = _open(_numbered(tmp_path))
    dataset = feed.tensor_batches(data.train)
    epochs = []
    for epoch in (0, 1, 5, 1):
        data.train.set_epoch(epoch)
        expected = [_rows(data.train[i]) for i in range(len(data.train))]
        assert [_rows(batch) for batch in dataset] == expected
        epochs.append(expected)
    assert epochs[0] != epochs[1] and epochs[1] == epochs[3]
    assert sorted(row for batch in epochs[2] for row in batch) == list(range(ROWS))


def _fit(data: TrainingData, x: object, *, initial_epoch: int, epochs: int, weights: list | None = None) -> list:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    if weights is not None:
        model.set_weights(weights)
    setter = EpochSetter(data.train)
    model.fit(x, epochs=epochs, initial_epoch=initial_epoch, shuffle=False, verbose=0, callbacks=[setter])
    return model.get_weights()


def test_fit_on_tensors_trains_as_on_the_pydataset_and_resumes_exactly(tmp_path: Path) -> None:
    """Same batches in the same order per epoch: the same weights as the PyDataset's fit, and a fit resumed at
    epoch 2 from the epoch-2 weights ends where the uninterrupted one does."""
    path = _numbered(tmp_path)
    data = _open(path)
    on_tensors = _fit(data, feed.fit_input(data.train), initial_epoch=0, epochs=4)
    reference = _open(path)
    on_pydataset = _fit(reference, reference.train, initial_epoch=0, epochs=4)
    for a, b in zip(on_tensors, on_pydataset, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    first = _open(path)
    at_two = _fit(first, feed.fit_input(first.train), initial_epoch=0, epochs=2)
    resumed_data = _open(path)
    resumed = _fit(resumed_data, feed.fit_input(resumed_data.train), initial_epoch=2, epochs=4, weights=at_two)
    for a, b in zip(resumed, on_tensors, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)

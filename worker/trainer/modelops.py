"""What a finished job's model is for: evaluate it on a data set, predict a batch, export it (ONNX, SavedModel).

Imports Keras: imported only after ``worker.trainer.env`` has set the backend and device, by the trainer at
the end of training (the exports a spec asks for, ``output.export``) and by ``python -m worker.trainer.ops``
(one operation of the API's, in a process of its own). Every file it writes is atomic.
"""

from __future__ import annotations

import contextlib
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import h5py
import keras
import numpy as np

from core.atomicio import atomic_path
from core.errors import DataError, Problem
from core.names import EXPORT_ARTIFACTS, MODEL_ONNX, SAVED_MODEL_ZIP
from models.build import allow_deep_graphs
from models.data.reader import open_training_data
from models.data.summary import DatasetSummary
from worker.trainer.events import jsonable

SPLITS = ("test", "val", "train")


def load_model(path: str | Path) -> keras.Model:
    """A job's ``model.h5``, compiled (its loss and metrics), in safe mode (no ``Lambda`` code runs)."""
    allow_deep_graphs()
    return keras.models.load_model(path, compile=True, safe_mode=True)


def evaluate_split(model: keras.Model, split: Any, batch_size: int) -> dict[str, Any]:
    """``model.evaluate`` on one split as the reader gives it: ``(x, y)`` arrays or a batch sequence; {} for
    None. The trainer's final test metrics and ``evaluate`` both come from here, so they agree."""
    if split is None:
        return {}
    if isinstance(split, tuple | list):
        x, y = split
        result = model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)
    else:
        result = model.evaluate(split, verbose=0, return_dict=True)
    return jsonable(result)


def evaluate(
    model: keras.Model,
    data_path: str | Path,
    summary: DatasetSummary,
    *,
    split: str,
    batch_size: int,
    in_memory_limit_bytes: int,
) -> dict[str, Any]:
    """The model's loss and metrics on one split (``test``, ``val`` or ``train``) of a checked data set,
    read exactly as the trainer reads it.

    Raises:
        DataError: the data set has no such split.
    """
    if split not in SPLITS or split not in summary.rows:
        have = ", ".join(summary.rows)
        raise DataError(
            [Problem("missing_split", f"the data set has no {split!r} split; expected one of: {have}", "split")]
        )
    data = open_training_data(
        data_path,
        summary,
        batch_size=batch_size,
        seed=0,
        shuffle=False,
        validation_split=0.0,
        in_memory_limit_bytes=in_memory_limit_bytes,
    )
    try:
        chosen = {"test": data.test, "val": data.validation, "train": data.train}[split]
        metrics = evaluate_split(model, chosen, batch_size)
    finally:
        data.close()
    return {"split": split, "rows": summary.rows[split], "metrics": metrics}


def read_inputs(path: str | Path, key: str = "X") -> np.ndarray:
    """A predict batch as float32: a ``.npy`` file the API wrote from JSON, or the checked HDF5 upload's ``key``."""
    path = Path(path)
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False).astype(np.float32, copy=False)
    with h5py.File(path, "r") as fh:
        return np.asarray(fh[key][...], dtype=np.float32)


def predict(model: keras.Model, x: np.ndarray, *, batch_size: int) -> dict[str, Any]:
    """The model's outputs for ``x`` (one row per input row), and the arg-max class of each for a classifier.

    Raises:
        DataError: ``x``'s rows do not have the model's input shape.
    """
    expected = list(model.input_shape[1:])
    if list(x.shape[1:]) != expected:
        detail = (
            f"the inputs have rows of shape {list(x.shape[1:])} ({x.shape[0]} rows); expected rows of shape "
            f"{expected}, the model's input"
        )
        raise DataError([Problem("shape_mismatch", detail, "inputs")])
    outputs = np.asarray(model.predict(x, batch_size=batch_size, verbose=0))
    result: dict[str, Any] = {"rows": int(x.shape[0]), "predictions": outputs.tolist()}
    if outputs.ndim == 2 and outputs.shape[1] > 1:
        result["classes"] = outputs.argmax(axis=1).tolist()
    return result


def export_model(model: keras.Model, out_dir: str | Path, formats: Iterable[str]) -> dict[str, str]:
    """Write the model as ``model.onnx`` and/or ``saved_model.zip`` into ``out_dir``, each atomically.

    ONNX: ``model.export(format="onnx")`` (tf2onnx on the TensorFlow backend), self-contained: a
    ``Normalization`` layer's mean and variance are folded in as constants (:func:`_constants_as_variables`),
    and a graph that still asks for more inputs than the model has is refused, never written. SavedModel:
    ``model.export(format="tf_saved_model")`` into a temporary folder, zipped under ``saved_model/``.

    Returns:
        Format → the artifact's path.
    """
    out = Path(out_dir)
    written: dict[str, str] = {}
    # A model loaded from .h5 was never called, and Keras exports only a called model: call it on one row.
    model(np.zeros((1, *model.input_shape[1:]), dtype=np.float32))
    for fmt in formats:
        target = out / EXPORT_ARTIFACTS[fmt]
        if target.name == MODEL_ONNX:
            with atomic_path(target) as tmp, _constants_as_variables(model):
                model.export(str(tmp), format="onnx", verbose=False)
                _check_onnx_inputs(tmp, model)
        elif target.name == SAVED_MODEL_ZIP:
            with tempfile.TemporaryDirectory(dir=out, prefix=".saved_model.") as work:
                folder = Path(work) / "saved_model"
                model.export(str(folder), format="tf_saved_model", verbose=False)
                with atomic_path(target) as tmp:
                    _zip_folder(folder, tmp)
        written[fmt] = str(target)
    return written


@contextlib.contextmanager
def _constants_as_variables(model: keras.Model) -> Iterator[None]:
    """Hold each ``Normalization`` layer's mean and variance in variables while the model is exported.

    The layer keeps them as eager tensors, which tf2onnx turns into extra required graph inputs (FACTS.md);
    variables it folds into the graph as initializers, like every weight. Restored afterwards.
    """
    if keras.backend.backend() != "tensorflow":
        yield
        return
    import tensorflow as tf  # the TensorFlow backend is running: this import is free

    swapped = []
    for layer in model._flatten_layers(include_self=False):  # nested models' layers too
        if isinstance(layer, keras.layers.Normalization) and getattr(layer, "mean", None) is not None:
            swapped.append((layer, layer.mean, layer.variance))
            layer.mean = tf.Variable(layer.mean, trainable=False)
            layer.variance = tf.Variable(layer.variance, trainable=False)
    try:
        yield
    finally:
        for layer, mean, variance in swapped:
            layer.mean, layer.variance = mean, variance


def _check_onnx_inputs(path: Path, model: keras.Model) -> None:
    """Refuse an ONNX graph that needs more inputs than the model has (a constant left as an input)."""
    import onnx  # only an ONNX export gets here; tf2onnx has imported it already

    names = [graph_input.name for graph_input in onnx.load(str(path)).graph.input]
    if len(names) != len(model.inputs):
        raise RuntimeError(
            f"the ONNX graph asks for {len(names)} inputs ({', '.join(names)[:300]}) where the model has "
            f"{len(model.inputs)}: it would not run on the input alone"
        )


def _zip_folder(folder: Path, target: Path) -> None:
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, Path(folder.name) / path.relative_to(folder))

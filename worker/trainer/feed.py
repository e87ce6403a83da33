"""How training batches reach ``model.fit``: in-memory data through the backend's fastest input path.

The reader's ``EpochBatches`` (a ``keras.utils.PyDataset``) decides the batch order, a pure function of
(seed, epoch), and streams from HDF5 when the data set is larger than the host-memory allowance. Keras on
TensorFlow turns a PyDataset into ``tf.data.Dataset.from_generator``: one Python call and one copy per
batch under the GIL, which cost the trainer ~15 % of a bare script's step rate on a 2-core CPU. When the
training rows are in memory on TensorFlow, :func:`fit_input` hands Keras a ``tf.data`` pipeline over
tensors instead (gather by index, in graph, prefetched), as Keras does for a bare script's NumPy arrays;
the order is still the PyDataset's, read once per epoch when Keras opens the epoch's iterator (after
``on_epoch_begin`` has set the epoch), so a resumed run sees the same batches as an uninterrupted one.
JAX and torch get the PyDataset: their Keras trainers iterate NumPy batches either way.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

#: The input paths :func:`fit_input` chooses from (recorded in the ``started`` event).
TENSORS = "tf.data from tensors"
PYDATASET_MEMORY = "PyDataset from memory"
PYDATASET_STREAMED = "PyDataset streamed from HDF5"


def input_path(batches: Any, backend: str | None = None) -> str:
    """Which input path :func:`fit_input` takes for ``batches`` on ``backend`` (Keras' current one)."""
    if batches.streamed:
        return PYDATASET_STREAMED
    if (backend or keras.backend.backend()) == "tensorflow":
        return TENSORS
    return PYDATASET_MEMORY


def fit_input(batches: Any) -> Any:
    """What ``model.fit`` gets for the training batches: ``batches`` itself, or a ``tf.data`` pipeline.

    Args:
        batches: the reader's ``EpochBatches`` over the training split.

    Returns:
        ``batches`` (streamed data, or a backend other than TensorFlow), else a ``tf.data.Dataset`` that
        yields the same batches in the same order (see :func:`tensor_batches`).
    """
    if input_path(batches) != TENSORS:
        return batches
    return tensor_batches(batches)


def tensor_batches(batches: Any) -> Any:
    """A ``tf.data.Dataset`` of ``batches``' in-memory rows in its current epoch's order, prefetched.

    Each iteration (Keras opens one per epoch, after ``on_epoch_begin``) asks ``batches`` for the order of
    the epoch it was last set to, once, then gathers each batch's rows from tensors in graph. The pipeline
    is the one Keras builds for a bare script's NumPy arrays (``ArrayDataAdapter``): the epoch's indices
    reshaped into full batches plus the partial one, a parallel gather, and tf.data's default graph
    rewrites off (they cost more than they save on a pipeline this small).
    """
    import tensorflow as tf  # only on the TensorFlow backend, where Keras has imported it already

    x, y = batches.split.arrays
    rows, batch_size, steps = int(batches.split.rows), int(batches.batch_size), len(batches)
    full = rows // batch_size
    arrays = (tf.convert_to_tensor(x), tf.convert_to_tensor(y))

    def epoch_order() -> np.ndarray:
        return np.asarray(batches.order(batches.epoch), dtype=np.int64)

    def batch_indices(_: Any) -> Any:
        order = tf.ensure_shape(tf.numpy_function(epoch_order, [], tf.int64, stateful=True), [rows])
        indices = tf.data.Dataset.from_tensor_slices(tf.reshape(order[: full * batch_size], [full, batch_size]))
        if rows > full * batch_size:
            indices = indices.concatenate(tf.data.Dataset.from_tensors(order[full * batch_size :]))
        return indices

    def gather(indices: Any, data: tuple[Any, Any]) -> tuple[Any, Any]:
        return tf.gather(data[0], indices), tf.gather(data[1], indices)

    dataset = tf.data.Dataset.range(1).flat_map(batch_indices)
    dataset = tf.data.Dataset.zip((dataset, tf.data.Dataset.from_tensors(arrays).repeat()))
    dataset = dataset.map(gather, num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    dataset = dataset.with_options(options).apply(tf.data.experimental.assert_cardinality(steps))
    return dataset.prefetch(tf.data.AUTOTUNE)

"""scikit-learn's digits written as a gpuyard HDF5 data set, for the demo, the tests and the benches."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from core.atomicio import atomic_path


def write_digits_h5(
    path: str | os.PathLike[str],
    *,
    image: bool = False,
    test_fraction: float = 0.2,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> Path:
    """Write the 1797 8×8 digits to ``path`` with the keys ``X_train``/``Y_train``/``X_test``/``Y_test``.

    X is float32 scaled to [0, 1], shaped ``(n, 64)`` or ``(n, 8, 8, 1)`` when ``image`` is true; Y is int64
    labels 0–9. Rows are shuffled with ``seed`` before the split, so the same arguments give the same file
    content. ``X_val``/``Y_val`` are written only when ``val_fraction`` is above 0.

    Args:
        path: where to write the file (written atomically; parent folders are created).
        image: shape X as 8×8 single-channel images for convolutional models.
        test_fraction: share of the rows put in the test split, in [0, 1).
        val_fraction: share of the rows put in the validation split, in [0, 1).
        seed: seed of the row shuffle.

    Returns:
        The path written.

    Raises:
        ValueError: a fraction outside [0, 1), or fractions leaving no training rows.
    """
    for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"Expected {name} in [0, 1). Received: {name}={value}")
    if test_fraction + val_fraction >= 1.0:
        raise ValueError(
            "Expected test_fraction + val_fraction < 1 so that training rows remain. "
            f"Received: test_fraction={test_fraction}, val_fraction={val_fraction}"
        )
    # Imported here: scikit-learn is only needed to write the demo file, not to read data sets.
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    if image:
        x = x.reshape(-1, 8, 8, 1)

    n = len(x)
    n_test = round(n * test_fraction)
    n_val = round(n * val_fraction)
    n_train = n - n_test - n_val
    splits = {
        "train": slice(0, n_train),
        "val": slice(n_train, n_train + n_val),
        "test": slice(n_train + n_val, n),
    }

    target = Path(path)
    with atomic_path(target) as tmp, h5py.File(tmp, "w") as f:
        for split, rows in splits.items():
            if split == "val" and n_val == 0:
                continue
            if split == "test" and n_test == 0:
                continue
            f.create_dataset(f"X_{split}", data=x[rows])
            f.create_dataset(f"Y_{split}", data=y[rows])
    return target

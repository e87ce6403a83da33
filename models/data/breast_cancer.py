"""scikit-learn's breast-cancer set written as a gpuyard HDF5 data set, standardized, for the course."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from core.atomicio import atomic_path


def write_breast_cancer_h5(
    path: str | os.PathLike[str],
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Path:
    """Write the 569 Wisconsin breast-cancer rows (30 features, labels 0/1) to ``path``.

    X is float32, standardized with the training split's per-feature mean and standard deviation (the
    raw features span 1e-3 to 4e3, which no plain-SGD network trains on); Y is int64. Rows are shuffled
    with ``seed`` before the split, so the same arguments give the same file content.

    Args:
        path: where to write the file (written atomically; parent folders are created).
        test_fraction: share of the rows put in the test split, in [0, 1).
        seed: seed of the row shuffle.

    Returns:
        The path written.

    Raises:
        ValueError: ``test_fraction`` outside [0, 1).
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"Expected test_fraction in [0, 1). Received: test_fraction={test_fraction}")
    # Imported here: scikit-learn is only needed to write the demo file, not to read data sets.
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = data.data.astype(np.float64)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_test = round(len(x) * test_fraction)
    n_train = len(x) - n_test
    mean = x[:n_train].mean(axis=0)
    std = x[:n_train].std(axis=0)
    std[std <= 1e-12] = 1.0
    x = ((x - mean) / std).astype(np.float32)

    target = Path(path)
    with atomic_path(target) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("X_train", data=x[:n_train])
        f.create_dataset("Y_train", data=y[:n_train])
        if n_test:
            f.create_dataset("X_test", data=x[n_train:])
            f.create_dataset("Y_test", data=y[n_train:])
    return target

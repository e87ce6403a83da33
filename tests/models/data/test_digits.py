"""The digits demo file: keys, shapes, dtypes and a deterministic split."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from models.data.digits import write_digits_h5
from models.data.inspect import inspect_file


def test_flat_digits_with_validation(tmp_path: Path) -> None:
    path = write_digits_h5(tmp_path / "d.h5", val_fraction=0.1, seed=3)
    with h5py.File(path, "r") as f:
        assert sorted(f) == ["X_test", "X_train", "X_val", "Y_test", "Y_train", "Y_val"]
        assert f["X_train"].dtype == np.float32 and f["Y_train"].dtype == np.int64
        assert f["X_train"].shape[1:] == (64,)
        assert sum(f[k].shape[0] for k in ("X_train", "X_val", "X_test")) == 1797
        assert f["X_train"][:].min() >= 0.0 and f["X_train"][:].max() <= 1.0
    summary = inspect_file(path)
    assert (summary.target, summary.num_classes, summary.rows["test"]) == ("integer_labels", 10, 359)


def test_image_digits_are_deterministic(tmp_path: Path) -> None:
    a = write_digits_h5(tmp_path / "a.h5", image=True, seed=1)
    b = write_digits_h5(tmp_path / "b.h5", image=True, seed=1)
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert fa["X_train"].shape[1:] == (8, 8, 1) and "X_val" not in fa
        assert np.array_equal(fa["X_train"][:], fb["X_train"][:])
        assert np.array_equal(fa["Y_test"][:], fb["Y_test"][:])


@pytest.mark.parametrize(
    "kwargs", [{"test_fraction": 1.0}, {"val_fraction": -0.1}, {"test_fraction": 0.6, "val_fraction": 0.5}]
)
def test_bad_fractions_are_refused(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError, match="Received"):
        write_digits_h5(tmp_path / "x.h5", **kwargs)
    assert not (tmp_path / "x.h5").exists()

"""The in-process checks: each hostile file is refused with its own code, its message naming key and value."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from hostile import CASES, ROWS, Case, write_good

from core.atomicio import file_sha256
from core.errors import DataError
from core.settings import Settings
from models.data import inspect as inspect_module
from models.data.inspect import inspect_file
from models.data.summary import DataKeys


def _refuse(case: Case, tmp_path: Path) -> list:
    path = case.build(tmp_path)
    with pytest.raises(DataError) as info:
        inspect_file(path, DataKeys(**case.keys), limits=Settings(**case.limits))
    return info.value.problems


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_file_is_refused_with_its_code_and_a_clear_message(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    problems = _refuse(case, tmp_path)
    matching = [p for p in problems if p.code == case.code]
    assert matching, f"{name}: expected code {case.code}, got {[p.code for p in problems]}"
    detail = " ".join(p.detail for p in matching)
    for text in case.mentions:
        assert text in detail, f"{name}: {text!r} not in {detail!r}"
    assert "expected" in detail


def test_distinct_hostile_files_give_distinct_codes(tmp_path: Path) -> None:
    produced: dict[str, frozenset[str]] = {}
    for name, case in CASES.items():
        folder = tmp_path / name
        folder.mkdir()
        produced[name] = frozenset(p.code for p in _refuse(case, folder))
    for a in CASES:
        for b in CASES:
            if CASES[a].code != CASES[b].code:
                assert produced[a] != produced[b], (a, b)
    assert len({case.code for case in CASES.values()}) >= 20


def test_every_reason_is_collected_not_just_the_first(tmp_path: Path) -> None:
    x = np.ones((ROWS, 4), np.float32)
    x[30, 1] = np.nan
    path = write_good(
        tmp_path / "many.h5", X_train=x, Y_train=np.full(ROWS, -2), X_test=np.ones((12, 7), "f4")
    )
    with h5py.File(path, "a") as f:
        f["elsewhere"] = h5py.ExternalLink("/etc/passwd", "/x")
    with pytest.raises(DataError) as info:
        inspect_file(path)
    codes = {p.code for p in info.value.problems}
    assert {"external_link", "non_finite", "negative_label", "shape_mismatch"} <= codes
    assert all(p.field for p in info.value.problems)


def test_no_data_is_read_from_bombs_or_external_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[str] = []
    original = inspect_module._slices

    def recording(ds, slice_bytes):  # type: ignore[no-untyped-def]
        read.append(ds.name)
        return original(ds, slice_bytes)

    monkeypatch.setattr(inspect_module, "_slices", recording)
    for name in ("declared_4tb", "fill_bomb", "external_storage", "virtual_dataset", "unknown_filter"):
        folder = tmp_path / name
        folder.mkdir()
        _refuse(CASES[name], folder)
        assert "/X_train" not in read, name
        read.clear()


def test_scan_reads_bounded_slices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    original = inspect_module._slices

    def recording(ds, slice_bytes):  # type: ignore[no-untyped-def]
        for start, block in original(ds, slice_bytes):
            sizes.append(block.nbytes)
            yield start, block

    monkeypatch.setattr(inspect_module, "_slices", recording)
    path = write_good(tmp_path / "ok.h5", rows=1000)
    inspect_file(path, limits=Settings(scan_slice_bytes=512))
    assert len(sizes) > 10 and max(sizes) <= 512


def test_summary_of_a_good_file(tmp_path: Path) -> None:
    path = write_good(tmp_path / "good.h5", val=True)
    summary = inspect_file(path)
    assert summary.rows == {"train": ROWS, "val": 10, "test": 12}
    assert summary.input_shape == [4]
    assert (summary.target, summary.num_classes, summary.output_dim) == ("integer_labels", 3, 3)
    assert summary.classes == [0, 1, 2]
    assert summary.arrays["x_train"].dtype == "float32" and summary.arrays["y_val"].shape == [10]
    assert summary.sha256 == file_sha256(path) and summary.size_bytes == path.stat().st_size


@pytest.mark.parametrize(
    ("y", "keys", "expected"),
    [
        (np.eye(3, dtype=np.float32)[np.arange(ROWS) % 3], {}, ("one_hot", 3, 3)),
        (np.linspace(0, 1, ROWS, dtype=np.float32), {}, ("regression", None, 1)),
        (np.random.default_rng(0).normal(size=(ROWS, 2)), {}, ("regression", None, 2)),
        ((np.arange(ROWS) % 4).astype(np.float64), {}, ("integer_labels", 4, 4)),
        ((np.arange(ROWS) % 4).reshape(-1, 1).astype(np.uint8), {}, ("integer_labels", 4, 4)),
        ((np.arange(ROWS) % 4).astype(np.int32), {"num_classes": 10}, ("integer_labels", 10, 10)),
    ],
    ids=["one_hot", "regression_1d", "regression_2d", "float_labels", "column_labels", "declared_classes"],
)
def test_target_kind_is_worked_out_from_the_labels(
    tmp_path: Path, y: np.ndarray, keys: dict, expected: tuple
) -> None:
    path = write_good(tmp_path / "t.h5", Y_train=y, X_test=None, Y_test=None)
    summary = inspect_file(path, DataKeys(**keys))
    assert (summary.target, summary.num_classes, summary.output_dim) == expected
    assert summary.rows == {"train": ROWS}


def test_soft_link_inside_the_file_is_accepted(tmp_path: Path) -> None:
    path = write_good(tmp_path / "soft.h5", test=False)
    with h5py.File(path, "a") as f:
        f.create_group("data")
        f["data/inputs"] = h5py.SoftLink("/X_train")
    summary = inspect_file(path, DataKeys(x_train="data/inputs"))
    assert summary.arrays["x_train"].key == "data/inputs" and summary.rows == {"train": ROWS}

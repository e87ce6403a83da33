"""Builders of small valid and hostile HDF5 files, shared by the data-set and CLI tests.

Each hostile case names the code it must be refused with, plus strings the message must contain (the key
and the offending value). Files stay tiny: the "big" ones only *declare* their size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

ROWS = 40
FEATURES = 4
CLASSES = 3


def write_good(
    path: Path, *, rows: int = ROWS, val: bool = False, test: bool = True, **overrides: Any
) -> Path:
    """A valid file: X float32 (rows, 4), Y int64 labels in [0, 3); ``overrides`` replace or add keys."""
    rng = np.random.default_rng(0)
    arrays: dict[str, Any] = {
        "X_train": rng.normal(size=(rows, FEATURES)).astype(np.float32),
        "Y_train": (np.arange(rows) % CLASSES).astype(np.int64),
    }
    if val:
        arrays["X_val"] = rng.normal(size=(10, FEATURES)).astype(np.float32)
        arrays["Y_val"] = (np.arange(10) % CLASSES).astype(np.int64)
    if test:
        arrays["X_test"] = rng.normal(size=(12, FEATURES)).astype(np.float32)
        arrays["Y_test"] = (np.arange(12) % CLASSES).astype(np.int64)
    arrays.update(overrides)
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            if value is None:
                continue
            if callable(value):
                value(f, key)
            else:
                f.create_dataset(key, data=value)
    return path


def _external_link(tmp: Path) -> Callable[[h5py.File, str], None]:
    victim = write_good(tmp / "victim.h5")

    def make(f: h5py.File, key: str) -> None:
        f[key] = h5py.ExternalLink(str(victim), "/X_train")

    return make


def _raw_external(tmp: Path) -> Callable[[h5py.File, str], None]:
    secret = tmp / "secret.bin"
    secret.write_bytes(np.ones(ROWS * FEATURES, np.float32).tobytes())

    def make(f: h5py.File, key: str) -> None:
        f.create_dataset(
            key, shape=(ROWS, FEATURES), dtype="f4", external=[(str(secret), 0, secret.stat().st_size)]
        )

    return make


def _virtual(tmp: Path) -> Callable[[h5py.File, str], None]:
    source = write_good(tmp / "vsource.h5")

    def make(f: h5py.File, key: str) -> None:
        layout = h5py.VirtualLayout(shape=(ROWS, FEATURES), dtype="f4")
        layout[:] = h5py.VirtualSource(str(source), "X_train", shape=(ROWS, FEATURES))
        f.create_virtual_dataset(key, layout)

    return make


def _declared(shape: tuple[int, ...], chunks: tuple[int, ...]) -> Callable[[h5py.File, str], None]:
    def make(f: h5py.File, key: str) -> None:
        f.create_dataset(
            key, shape=shape, dtype="f4", chunks=chunks
        )  # nothing written: reads give fill values

    return make


def _unknown_filter(f: h5py.File, key: str) -> None:
    # Filter 32015 (zstd) is not built into libhdf5; declared only, since it cannot be written here.
    f.create_dataset(
        key,
        shape=(ROWS, FEATURES),
        dtype="f4",
        chunks=(ROWS, FEATURES),
        compression=32015,
        allow_unknown_filter=True,
    )


def _with_bad_value(value: float, row: int, rows: int = 2000) -> np.ndarray:
    x = np.random.default_rng(1).normal(size=(rows, FEATURES)).astype(np.float32)
    x[row, 2] = value
    return x


def _group(f: h5py.File, key: str) -> None:
    f.create_group(key).create_dataset("inner", data=np.zeros((ROWS, FEATURES), np.float32))


def _scalar(f: h5py.File, key: str) -> None:
    f.create_dataset(key, data=np.float32(3.0))


def _dangling(f: h5py.File, key: str) -> None:
    f[key] = h5py.SoftLink("/nowhere")


def _enum(f: h5py.File, key: str) -> None:
    dt = h5py.enum_dtype({"RED": 0, "GREEN": 1, "BLUE": 2}, basetype="i1")
    f.create_dataset(key, data=(np.arange(ROWS) % 3).astype("i1"), dtype=dt)


def _vlen(f: h5py.File, key: str) -> None:
    ds = f.create_dataset(key, shape=(ROWS,), dtype=h5py.vlen_dtype(np.float32))
    for i in range(ROWS):
        ds[i] = np.arange(i % 3 + 1, dtype=np.float32)


@dataclass(frozen=True)
class Case:
    """One hostile file: how to build it, the code it must get, what its message must mention."""

    code: str
    build: Callable[[Path], Path]
    mentions: tuple[str, ...]
    keys: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)


def _file(**overrides: Any) -> Callable[[Path], Path]:
    return lambda tmp: write_good(tmp / "hostile.h5", **overrides)


def _lazy(
    make: Callable[[Path], Callable[[h5py.File, str], None]], key: str = "X_train"
) -> Callable[[Path], Path]:
    return lambda tmp: write_good(tmp / "hostile.h5", **{key: make(tmp)})


def _text_file(tmp: Path) -> Path:
    path = tmp / "notes.h5"
    path.write_text("X_train,Y_train\n1,2\n")
    return path


def _truncated(tmp: Path) -> Path:
    whole = write_good(tmp / "whole.h5", rows=400)
    path = tmp / "truncated.h5"
    data = whole.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _soft_outside(tmp: Path) -> Path:
    path = write_good(tmp / "hostile.h5", ext=_external_link(tmp))
    with h5py.File(path, "a") as f:
        f["alias"] = h5py.SoftLink("/ext/anything")
    return path


#: Every refusal the checks make, by a name used as the test id.
CASES: dict[str, Case] = {
    "not_hdf5": Case("not_hdf5", _text_file, ("notes.h5", "X_train,Y_train")),
    "truncated": Case("truncated", _truncated, ("truncated.h5", "truncated")),
    "missing_key": Case("missing_key", _file(Y_train=None), ("Y_train", "not found")),
    "group": Case("not_a_dataset", _file(X_train=_group), ("X_train", "group")),
    "scalar": Case("scalar", _file(X_train=_scalar), ("X_train", "()")),
    "zero_rows": Case("empty", _file(X_train=np.zeros((0, FEATURES), np.float32)), ("X_train", "0 rows")),
    "row_mismatch": Case(
        "row_mismatch", _file(Y_train=np.zeros(ROWS - 1, np.int64)), ("Y_train", "39", "40")
    ),
    "shape_mismatch": Case("shape_mismatch", _file(X_test=np.zeros((12, 5), np.float32)), ("X_test", "(5,)")),
    "unpaired": Case("unpaired_key", _file(X_val=np.zeros((5, FEATURES), np.float32)), ("X_val", "Y_val")),
    "strings": Case("bad_dtype", _file(X_train=np.array([b"abc"] * ROWS)), ("X_train", "S3", "strings")),
    "compound": Case(
        "bad_dtype",
        _file(X_train=np.zeros(ROWS, dtype=[("a", "f4"), ("b", "i4")])),
        ("X_train", "compound"),
    ),
    "complex": Case("bad_dtype", _file(X_train=np.ones((ROWS, 2), np.complex64)), ("X_train", "complex64")),
    "enum": Case("bad_dtype", _file(Y_train=_enum), ("Y_train", "enumeration")),
    "bool": Case("bad_dtype", _file(Y_train=np.ones(ROWS, bool)), ("Y_train", "bool")),
    "vlen": Case("bad_dtype", _file(X_train=_vlen), ("X_train", "variable-length")),
    "nan_late": Case(
        "non_finite",
        _file(X_train=_with_bad_value(np.nan, 1700), Y_train=np.zeros(2000, np.int64)),
        ("X_train", "NaN", "row 1700"),
        limits={"scan_slice_bytes": 256},
    ),
    "inf_late": Case(
        "non_finite",
        _file(X_train=_with_bad_value(np.inf, 1999), Y_train=np.zeros(2000, np.int64)),
        ("X_train", "Inf", "row 1999"),
        limits={"scan_slice_bytes": 256},
    ),
    "negative_label": Case(
        "negative_label", _file(Y_train=np.where(np.arange(ROWS) == 7, -1, 1)), ("Y_train", "-1", "row 7")
    ),
    "label_out_of_range": Case(
        "label_out_of_range",
        _file(Y_train=np.where(np.arange(ROWS) == 9, 5, 1)),
        ("Y_train", "label 5", "row 9", "num_classes=3"),
        keys={"num_classes": 3},
    ),
    "non_integer_label": Case(
        "non_integer_label",
        _file(Y_train=np.where(np.arange(ROWS) == 4, 0.5, 1.0)),
        ("Y_train", "0.5", "row 4"),
        keys={"num_classes": 3},
    ),
    "external_link": Case("external_link", _lazy(_external_link), ("X_train", "victim.h5")),
    "soft_link_dangling": Case(
        "soft_link", _file(X_alias=_dangling), ("X_alias", "/nowhere", "does not exist")
    ),
    "soft_link_outside": Case("soft_link", _soft_outside, ("alias", "/ext/anything", "external link")),
    "external_storage": Case("external_storage", _lazy(_raw_external), ("X_train", "secret.bin")),
    "virtual_dataset": Case("virtual_dataset", _lazy(_virtual), ("X_train", "vsource.h5")),
    "declared_4tb": Case(
        "declared_too_large",
        _file(X_train=_declared((10**9, 1000), (1024, 64))),
        ("X_train", "(1000000000, 1000)", "3.6 TiB"),
    ),
    "fill_bomb": Case(
        "declared_size_bomb",
        _file(X_train=_declared((10**6, 100), (1024, 100)), Y_train=np.zeros(10**6 // 1000, np.int64)),
        ("X_train", "(1000000, 100)", "381.5 MiB"),
    ),
    "unknown_filter": Case("unsupported_filter", _file(X_train=_unknown_filter), ("X_train", "32015")),
    "too_many_classes": Case(
        "too_many_classes", _file(Y_train=np.where(np.arange(ROWS) == 3, 10**7, 1)), ("Y_train", "10000001")
    ),
}

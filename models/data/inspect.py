"""In-process checks of an HDF5 data set: every reason to refuse it, or the summary that trains on it.

Uploaded files are untrusted: call this through :func:`models.data.sandbox.check_file`, which runs it in a
child process under resource limits. The checks go in an order that never reads data it should not:

1. the file itself: exists, carries the HDF5 signature, opens (``not_found``, ``not_hdf5``, ``truncated``,
   ``corrupt``);
2. every link and dataset in the file, walked without following links: ``external_link``, ``soft_link``
   (dangling, looping or leading out through an external link), ``external_storage``, ``virtual_dataset``;
3. the six role keys, from metadata only: ``missing_key``, ``unpaired_key``, ``not_a_dataset``,
   ``bad_dtype``, ``scalar``, ``empty``, ``bad_shape``, ``unsupported_filter``, ``declared_size_bomb``,
   ``declared_too_large``, ``row_mismatch``, ``shape_mismatch``;
4. only then the data, in slices of ``scan_slice_bytes``, of the arrays that passed: ``non_finite``,
   ``negative_label``, ``label_out_of_range``, ``non_integer_label``, ``not_one_hot``,
   ``class_count_mismatch``, ``too_many_classes``, ``read_error``.

Every reason found is reported (one :class:`~core.errors.Problem` each), not just the first. Steps 1 and 2
are in ``models/data/structure.py``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from core.atomicio import file_sha256
from core.errors import DataError, Problem
from core.settings import DataLimits, get_settings
from models.data.structure import LinkChecks, attr_text, key_list, open_checked
from models.data.summary import ArrayInfo, DataKeys, DatasetSummary, TargetKind

#: HDF5 filters built into libhdf5 (plus h5py's LZF); any other filter would need a plugin library.
ALLOWED_FILTERS = {
    1: "gzip",
    2: "shuffle",
    3: "fletcher32",
    4: "szip",
    5: "nbit",
    6: "scaleoffset",
    32000: "lzf",
}
MAX_LISTED_CLASSES = 1000
ROLES = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
SPLITS = {"train": ("x_train", "y_train"), "val": ("x_val", "y_val"), "test": ("x_test", "y_test")}


def inspect_file(
    path: str | os.PathLike[str],
    keys: DataKeys | None = None,
    *,
    limits: DataLimits | None = None,
    sha256: str | None = None,
) -> DatasetSummary:
    """Check an HDF5 data set and summarise it, or refuse it with every reason found.

    Runs in the calling process: for uploads use :func:`models.data.sandbox.check_file`.

    Args:
        path: the HDF5 file.
        keys: which keys hold which array, and optionally the declared number of classes.
        limits: size and scanning limits (``max_declared_*``, ``scan_slice_bytes``, ``max_classes``);
            defaults to the process settings.
        sha256: the file's SHA-256 when the caller already has it (an upload is hashed while it streams
            in); None reads the file once more to compute it.

    Returns:
        The summary: arrays by role, rows per split, input shape, target kind and output size, sha256.

    Raises:
        DataError: the file is refused; ``problems`` holds one Problem per reason.
        MemoryError: the process ran out of memory (the sandbox turns it into ``validator_memory_limit``).
    """
    keys = keys or DataKeys()
    limits = limits or get_settings()
    path = Path(path)
    handle, size_bytes = open_checked(path)
    with handle:
        inspection = _Inspection(handle, keys, limits)
        inspection.run()
    if inspection.problems:
        raise DataError(inspection.problems)
    return inspection.summary(sha256=sha256 or file_sha256(path), size_bytes=size_bytes)


def inspect_inputs(path: str | os.PathLike[str], key: str = "X", *, limits: DataLimits | None = None) -> ArrayInfo:
    """Check an HDF5 file holding one input array (a predict batch, no targets): the checks a data set's
    ``X_train`` passes — file, links, storage, dtype, shape, declared size, finite values.

    Runs in the calling process: for uploads use :func:`models.data.sandbox.check_inputs`.

    Raises:
        DataError: the file is refused; ``problems`` holds one Problem per reason.
    """
    limits = limits or get_settings()
    path = Path(path)
    handle, _size = open_checked(path)
    with handle:
        inspection = _Inspection(handle, DataKeys(x_train=key), limits)
        inspection._walk_links()
        inspection._check_role("x_train")
        if "x_train" in inspection.datasets:
            inspection._scan("x_train", inspection.datasets["x_train"])
        ds = inspection.datasets.get("x_train")
        if inspection.problems or ds is None:
            raise DataError(inspection.problems or [Problem("missing_key", f"{key}: no usable dataset", key)])
        return ArrayInfo(key=key, shape=list(ds.shape), dtype=ds.dtype.name, rows=int(ds.shape[0]))




# ----------------------------------------------------------------------------------------------- the walk


@dataclass
class _YStats:
    """What a scan of one target array found."""

    finite: bool = True
    integer_valued: bool = True
    first_non_integer: tuple[int, float] | None = None
    min: float = math.inf
    max: float = -math.inf
    first_negative: tuple[int, float] | None = None
    negatives: int = 0
    first_at_or_above: tuple[int, float] | None = None  # first label >= declared num_classes
    one_hot: bool = True
    first_not_one_hot: int | None = None
    column_sums: np.ndarray | None = None
    distinct: set[int] = field(default_factory=set)
    distinct_overflow: bool = False


class _Inspection(LinkChecks):
    """One pass over an open file: collects problems, then builds the summary."""

    def __init__(self, handle: h5py.File, keys: DataKeys, limits: DataLimits) -> None:
        self.f = handle
        self.keys = keys
        self.limits = limits
        self.problems: list[Problem] = []
        self.unsafe: set[int] = set()  # hashes of datasets with external/virtual storage: never read
        self.datasets: dict[str, h5py.Dataset] = {}  # role -> dataset that passed the metadata checks
        self.y_stats: dict[str, _YStats] = {}
        self.target: TargetKind = "regression"
        self.num_classes: int | None = None
        self.classes: list[int] | None = None
        self.output_dim = 1

    def add(self, code: str, detail: str, key: str | None) -> None:
        self.problems.append(Problem(code, detail, field=key))

    def run(self) -> None:
        self._walk_links()
        for role in ROLES:
            self._check_role(role)
        self._check_splits()
        for role, ds in list(self.datasets.items()):
            self._scan(role, ds)
        self._decide_target()

    # -- 3. the role keys, metadata only

    def _check_role(self, role: str) -> None:
        key = getattr(self.keys, role)
        label = key
        status, obj, _ = self._resolve(key)
        if status == "link":
            return  # the walk has reported the external or soft link on the way (never follow it)
        if status == "missing":
            if role in ("x_train", "y_train"):
                self.add(
                    "missing_key",
                    f"{label}: key not found in the file; expected a dataset for "
                    f"{role} (top-level keys: {key_list(self.f)})",
                    key,
                )
            return
        if not isinstance(obj, h5py.Dataset):
            kind = "a group" if isinstance(obj, h5py.Group) else f"a {type(obj).__name__}"
            self.add("not_a_dataset", f"{label} is {kind}; expected a dataset holding the {role} array", key)
            return
        if hash(obj.id) in self.unsafe:
            return  # already refused by the walk; never read it
        if self._check_dataset(role, key, obj):
            self.datasets[role] = obj

    def _check_dataset(self, role: str, key: str, ds: h5py.Dataset) -> bool:
        ok = True
        try:
            dtype = ds.dtype
        except Exception as exc:  # h5py cannot map some HDF5 types to numpy
            self.add(
                "bad_dtype",
                f"{key} has an HDF5 type numpy cannot represent ({exc}); expected integers or floats",
                key,
            )
            return False
        reason = _dtype_problem(dtype)
        if reason:
            self.add(
                "bad_dtype",
                f"{key} has dtype {_dtype_name(dtype)} ({reason}); expected numbers "
                "(signed/unsigned integers or floats of 16–64 bits)",
                key,
            )
            ok = False
        shape = tuple(ds.shape) if ds.shape is not None else ()
        if ds.shape is None or len(shape) == 0:
            self.add(
                "scalar", f"{key} is a scalar (shape {shape}); expected an array with one row per sample", key
            )
            return False
        if shape[0] == 0:
            self.add("empty", f"{key} has 0 rows (shape {shape}); expected at least one row", key)
            ok = False
        if role.startswith("x") and len(shape) < 2:
            self.add(
                "bad_shape",
                f"{key} has shape {shape}; expected (rows, features…) with at least 2 dimensions",
                key,
            )
            ok = False
        if role.startswith("y") and len(shape) > 2:
            self.add(
                "bad_shape",
                f"{key} has shape {shape}; expected (rows,) labels or (rows, columns) targets",
                key,
            )
            ok = False
        if any(d == 0 for d in shape[1:]):
            self.add(
                "bad_shape",
                f"{key} has shape {shape} with an empty feature axis; expected every axis "
                "after the first to be at least 1",
                key,
            )
            ok = False
        ok = self._check_filters(key, ds) and ok
        return self._check_size(key, ds, shape, dtype) and ok

    def _check_filters(self, key: str, ds: h5py.Dataset) -> bool:
        plist = ds.id.get_create_plist()
        for index in range(plist.get_nfilters()):
            code, _flags, _values, name = plist.get_filter(index)
            if code not in ALLOWED_FILTERS:
                self.add(
                    "unsupported_filter",
                    f"{key} is compressed with filter {code} ({attr_text(name)!r}); "
                    f"expected one of the built-in filters {sorted(ALLOWED_FILTERS.values())}",
                    key,
                )
                return False
        return True

    def _check_size(self, key: str, ds: h5py.Dataset, shape: tuple[int, ...], dtype: np.dtype) -> bool:
        declared = math.prod(shape) * dtype.itemsize
        stored = ds.id.get_storage_size()
        ok = True
        described = f"{key} declares {_size(declared)} (shape {shape}, {_dtype_name(dtype)})"
        if declared > self.limits.max_declared_bytes_unchecked:
            ratio = declared / max(stored, 1)
            if ratio > self.limits.max_declared_ratio:
                self.add(
                    "declared_size_bomb",
                    f"{described} but stores only {_size(stored)}, a ratio of "
                    f"{ratio:.3g}; expected at most {self.limits.max_declared_ratio:g} "
                    "(max_declared_ratio) — refused as a fill-value or compression bomb",
                    key,
                )
                ok = False
        if declared > self.limits.max_declared_bytes:
            self.add(
                "declared_too_large",
                f"{described}; expected at most {_size(self.limits.max_declared_bytes)} (max_declared_bytes)",
                key,
            )
            ok = False
        return ok

    def _check_splits(self) -> None:
        for split, (x_role, y_role) in SPLITS.items():
            if split != "train":
                x_there = self._exists(x_role)
                y_there = self._exists(y_role)
                if x_there != y_there:
                    have, lack = (x_role, y_role) if x_there else (y_role, x_role)
                    self.add(
                        "unpaired_key",
                        f"{getattr(self.keys, have)} is present but "
                        f"{getattr(self.keys, lack)} is missing; expected both or neither for the "
                        f"{split} split",
                        getattr(self.keys, lack),
                    )
                    self.datasets.pop(have, None)
                    continue
            x, y = self.datasets.get(x_role), self.datasets.get(y_role)
            if x is not None and y is not None and x.shape[0] != y.shape[0]:
                self.add(
                    "row_mismatch",
                    f"{getattr(self.keys, y_role)} has {y.shape[0]} rows, "
                    f"{getattr(self.keys, x_role)} has {x.shape[0]}; expected the same number of rows",
                    getattr(self.keys, y_role),
                )
                self.datasets.pop(x_role)
                self.datasets.pop(y_role)
            if split == "train":
                continue
            for role, train_role in ((x_role, "x_train"), (y_role, "y_train")):
                this, train = self.datasets.get(role), self.datasets.get(train_role)
                if this is None or train is None:
                    continue
                mine, theirs = _row_shape(this.shape, role), _row_shape(train.shape, train_role)
                if mine != theirs:
                    self.add(
                        "shape_mismatch",
                        f"{getattr(self.keys, role)} has rows of shape {mine}, "
                        f"{getattr(self.keys, train_role)} rows of shape {theirs}; expected the same shape",
                        getattr(self.keys, role),
                    )
                    self.datasets.pop(role)

    def _exists(self, role: str) -> bool:
        return self._resolve(getattr(self.keys, role))[0] != "missing"

    # -- 4. the data, in bounded slices

    def _scan(self, role: str, ds: h5py.Dataset) -> None:
        key = getattr(self.keys, role)
        is_float = ds.dtype.kind == "f"
        stats = _YStats() if role.startswith("y") else None
        if stats is None and not is_float:
            return  # integer inputs are always finite: nothing to read
        first_bad: int | None = None
        bad_rows = 0
        bad_kind = ""
        try:
            for start, block in _slices(ds, self.limits.scan_slice_bytes):
                rows = block.reshape(len(block), -1)
                if is_float:
                    finite = np.isfinite(rows)
                    bad = ~finite.all(axis=1)
                    count = int(bad.sum())
                    if count:
                        if first_bad is None:
                            index = int(np.flatnonzero(bad)[0])
                            first_bad = start + index
                            bad_kind = "NaN" if np.isnan(rows[index]).any() else "Inf"
                        bad_rows += count
                        continue
                if stats is not None and first_bad is None:
                    self._scan_targets(stats, start, rows, is_float)
        except MemoryError:
            raise
        except Exception as exc:
            if _is_allocation_failure(exc):
                raise MemoryError(str(exc)) from exc
            self.add(
                "read_error",
                f"{key}: reading the data failed ({type(exc).__name__}: {exc}); expected a "
                "readable dataset — the file may be corrupt",
                key,
            )
            self.datasets.pop(role, None)
            return
        if first_bad is not None:
            self.add(
                "non_finite",
                f"{key} has {bad_kind} at row {first_bad} ({bad_rows} row(s) with NaN or Inf "
                "in all); expected finite numbers",
                key,
            )
            self.datasets.pop(role, None)
            return
        if stats is not None:
            self.y_stats[role] = stats

    def _scan_targets(self, stats: _YStats, start: int, rows: np.ndarray, is_float: bool) -> None:
        values = rows
        if is_float and stats.integer_valued:
            fractional = (values != np.floor(values)).any(axis=1)
            if fractional.any():
                stats.integer_valued = False
                index = int(np.flatnonzero(fractional)[0])
                stats.first_non_integer = (start + index, _first_fraction(values[index]))
        if values.size:
            stats.min = min(stats.min, float(values.min()))
            stats.max = max(stats.max, float(values.max()))
        negative = (values < 0).any(axis=1)
        count = int(negative.sum())
        if count:
            stats.negatives += count
            if stats.first_negative is None:
                index = int(np.flatnonzero(negative)[0])
                stats.first_negative = (start + index, float(values[index].min()))
        if self.keys.num_classes is not None and stats.first_at_or_above is None:
            above = (values >= self.keys.num_classes).any(axis=1)
            if above.any():
                index = int(np.flatnonzero(above)[0])
                stats.first_at_or_above = (start + index, float(values[index].max()))
        if values.shape[1] > 1 and stats.one_hot:
            binary = ((values == 0) | (values == 1)).all(axis=1) & (values.sum(axis=1) == 1)
            if not binary.all():
                stats.one_hot = False
                stats.first_not_one_hot = start + int(np.flatnonzero(~binary)[0])
            else:
                sums = values.sum(axis=0, dtype=np.int64)
                stats.column_sums = sums if stats.column_sums is None else stats.column_sums + sums
        if values.shape[1] == 1 and stats.integer_valued and not stats.distinct_overflow:
            stats.distinct.update(int(v) for v in np.unique(values))
            if len(stats.distinct) > MAX_LISTED_CLASSES:
                stats.distinct_overflow = True

    # -- the target kind and output size

    def _decide_target(self) -> None:
        train = self.datasets.get("y_train")
        stats = self.y_stats.get("y_train")
        if train is None or stats is None:
            return
        columns = 1 if train.ndim == 1 else int(train.shape[1])
        y_roles = [r for r in ("y_train", "y_val", "y_test") if r in self.y_stats]
        if columns == 1:
            declared = self.keys.num_classes
            is_int = train.dtype.kind in "iu"
            all_integer = all(self.y_stats[r].integer_valued for r in y_roles)
            lowest = min(self.y_stats[r].min for r in y_roles)
            if declared is not None or is_int or (all_integer and lowest >= 0):
                self.target = "integer_labels"
                self._check_labels(y_roles)
                return
            self.target, self.output_dim = "regression", 1
            return
        if stats.one_hot:
            self.target, self.num_classes, self.output_dim = "one_hot", columns, columns
            for role in y_roles:
                other = self.y_stats[role]
                key = getattr(self.keys, role)
                if not other.one_hot:
                    self.add(
                        "not_one_hot",
                        f"{key} row {other.first_not_one_hot} is not one-hot (0/1 values "
                        f"summing to 1), but {self.keys.y_train} is; expected one-hot rows in every split",
                        key,
                    )
            if self.keys.num_classes is not None and self.keys.num_classes != columns:
                self.add(
                    "class_count_mismatch",
                    f"{self.keys.y_train} is one-hot with {columns} columns but "
                    f"num_classes={self.keys.num_classes}; expected as many columns as classes",
                    self.keys.y_train,
                )
            sums = np.zeros(columns, np.int64)
            for role in y_roles:
                column_sums = self.y_stats[role].column_sums
                if column_sums is not None:
                    sums = sums + column_sums
            self.classes = [int(i) for i in np.flatnonzero(sums)][:MAX_LISTED_CLASSES]
            return
        self.target, self.output_dim = "regression", columns

    def _check_labels(self, y_roles: Sequence[str]) -> None:
        declared = self.keys.num_classes
        for role in y_roles:
            stats = self.y_stats[role]
            key = getattr(self.keys, role)
            classes_txt = f"num_classes={declared}" if declared else "integer class labels"
            if not stats.integer_valued and stats.first_non_integer is not None:
                row, value = stats.first_non_integer
                self.add(
                    "non_integer_label",
                    f"{key} has value {value:g} at row {row}; expected whole numbers "
                    f"as class labels ({classes_txt})",
                    key,
                )
            if stats.first_negative is not None:
                row, value = stats.first_negative
                self.add(
                    "negative_label",
                    f"{key} has label {value:g} at row {row} ({stats.negatives} negative "
                    "label(s) in all); expected class indices ≥ 0",
                    key,
                )
            if declared is not None and stats.first_at_or_above is not None:
                row, value = stats.first_at_or_above
                self.add(
                    "label_out_of_range",
                    f"{key} has label {value:g} at row {row}; expected labels in "
                    f"[0, {declared}) for num_classes={declared}",
                    key,
                )
        highest = max(self.y_stats[r].max for r in y_roles)
        self.num_classes = declared if declared is not None else max(2, int(highest) + 1)
        if self.num_classes > self.limits.max_classes:
            self.add(
                "too_many_classes",
                f"{self.keys.y_train} implies {self.num_classes} classes (largest label "
                f"{highest:g}); expected at most {self.limits.max_classes} (max_classes) — declare "
                "num_classes or check the labels",
                self.keys.y_train,
            )
        self.output_dim = self.num_classes
        seen: set[int] = set()
        for role in y_roles:
            seen |= self.y_stats[role].distinct
        self.classes = sorted(seen)[:MAX_LISTED_CLASSES]

    # -- the result

    def summary(self, *, sha256: str, size_bytes: int) -> DatasetSummary:
        arrays = {
            role: ArrayInfo(
                key=getattr(self.keys, role), shape=list(ds.shape), dtype=ds.dtype.name, rows=int(ds.shape[0])
            )
            for role, ds in self.datasets.items()
        }
        rows = {split: arrays[x].rows for split, (x, _) in SPLITS.items() if x in arrays}
        return DatasetSummary(
            sha256=sha256,
            size_bytes=size_bytes,
            keys=self.keys,
            arrays=arrays,
            rows=rows,
            input_shape=list(self.datasets["x_train"].shape[1:]),
            target=self.target,
            num_classes=self.num_classes,
            classes=self.classes,
            output_dim=self.output_dim,
        )


# ----------------------------------------------------------------------------------------------- helpers


def _slices(ds: h5py.Dataset, slice_bytes: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_row, rows)`` blocks of about ``slice_bytes`` each (at least one row)."""
    row_bytes = max(1, math.prod(ds.shape[1:]) * ds.dtype.itemsize)
    step = max(1, slice_bytes // row_bytes)
    for start in range(0, ds.shape[0], step):
        yield start, ds[start : start + step]


def _dtype_problem(dtype: np.dtype) -> str | None:
    """Why ``dtype`` is not a plain number type, or None."""
    if dtype.names is not None:
        return "a compound type"
    if dtype.subdtype is not None:
        return "an array type"
    if h5py.check_enum_dtype(dtype) is not None:
        return "an enumeration"
    if h5py.check_string_dtype(dtype) is not None or dtype.kind in "SU":
        return "strings"
    if h5py.check_vlen_dtype(dtype) is not None or dtype.kind == "O":
        return "variable-length or object values"
    if dtype.kind == "c":
        return "complex numbers"
    if dtype.kind == "b":
        return "booleans"
    if dtype.kind in "iu":
        return None
    if dtype.kind == "f":
        return None if dtype.itemsize in (2, 4, 8) else f"a {dtype.itemsize * 8}-bit float"
    return "opaque or unsupported values"


def _dtype_name(dtype: np.dtype) -> str:
    return repr(str(dtype).lstrip("|<>=") if dtype.names is None else str(dtype))


def _row_shape(shape: tuple[int, ...], role: str) -> tuple[int, ...]:
    """A row's shape; for targets ``(n,)`` and ``(n, 1)`` count as the same."""
    rest = tuple(shape[1:])
    return () if role.startswith("y") and rest == (1,) else rest


def _first_fraction(row: np.ndarray) -> float:
    fractional = row[row != np.floor(row)]
    return float(fractional[0]) if fractional.size else float(row[0])


def _is_allocation_failure(exc: BaseException) -> bool:
    message = str(exc).lower()
    return "memory allocation failed" in message or "can't allocate" in message or "out of memory" in message


def _size(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} bytes"

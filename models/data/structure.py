"""Steps 1 and 2 of the HDF5 checks (models/data/inspect.py): the file itself, then every link and dataset
in it walked without following links; nothing is read from any dataset here.

``not_found``, ``not_hdf5``, ``truncated``, ``corrupt``; ``external_link``, ``soft_link`` (dangling, looping or
leading out through an external link), ``external_storage``, ``virtual_dataset``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py

from core.errors import DataError, Problem

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: A file with more links than this is refused rather than walked (a cheap denial of service otherwise).
MAX_LINKS = 100_000
MAX_SOFT_LINK_DEPTH = 16


def open_checked(path: Path) -> tuple[h5py.File, int]:
    """The file-level checks, then the file opened read-only (DataError naming why it cannot be)."""
    size_bytes = check_file_level(path)
    try:
        return h5py.File(path, "r"), size_bytes
    except OSError as exc:
        raise DataError([open_problem(path, size_bytes, exc)]) from exc


def check_file_level(path: Path) -> int:
    """Refuse a missing, unreadable or non-HDF5 file; return its size."""
    try:
        if not path.is_file():
            raise DataError(
                [
                    Problem(
                        "not_found", f"{path.name} does not exist or is not a regular file; expected an HDF5 file"
                    )
                ]
            )
        size = path.stat().st_size
        with open(path, "rb") as fh:
            if not _has_signature(fh, size):
                raise DataError(
                    [
                        Problem(
                            "not_hdf5",
                            f"{path.name} is not an HDF5 file (no HDF5 signature at byte 0, 512, 1024, …; "
                            f"{size} bytes starting {_head(path)!r}); "
                            "expected an HDF5 file such as h5py writes",
                        )
                    ]
                )
    except PermissionError as exc:
        raise DataError(
            [Problem("unreadable", f"{path.name} cannot be read ({exc.strerror}); expected a readable file")]
        ) from exc
    return size


def _has_signature(fh: Any, size: int) -> bool:
    """HDF5 puts its signature at byte 0, or after a user block at 512, 1024, 2048, …"""
    offset = 0
    while offset + len(HDF5_SIGNATURE) <= size:
        fh.seek(offset)
        if fh.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
            return True
        offset = 512 if offset == 0 else offset * 2
    return False


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(16)


def open_problem(path: Path, size: int, exc: OSError) -> Problem:
    message = str(exc)
    if "truncated" in message.lower():
        return Problem(
            "truncated",
            f"{path.name} is truncated: it has {size} bytes but HDF5 expects more ({message}); "
            "expected the complete file — upload it again",
        )
    return Problem(
        "corrupt",
        f"{path.name} has an HDF5 signature but cannot be opened ({message}); expected a valid HDF5 file",
    )


class LinkChecks:
    """The walk over links and storage: a part of one inspection (its ``f``, ``unsafe`` and ``add``)."""

    f: h5py.File
    unsafe: set[int]

    def add(self, code: str, detail: str, key: str | None) -> None:
        raise NotImplementedError

    def _walk_links(self) -> None:
        count = 0

        def visit(name: str, link: Any) -> bool | None:
            nonlocal count
            count += 1
            if count > MAX_LINKS:
                self.add(
                    "too_many_objects",
                    f"the file holds more than {MAX_LINKS} links; expected a data set "
                    "with a handful of arrays",
                    None,
                )
                return True
            where = "/" + name
            if isinstance(link, h5py.ExternalLink):
                self.add(
                    "external_link",
                    f"{where} is an external link to {link.path!r} in file "
                    f"{link.filename!r}; expected every array stored inside this file "
                    "(links to other files are refused)",
                    name,
                )
            elif isinstance(link, h5py.SoftLink):
                status, _, why = self._resolve(link.path, base=name.rpartition("/")[0])
                if status != "ok":
                    self.add(
                        "soft_link",
                        f"{where} is a soft link to {link.path!r}, which {why}; expected "
                        "soft links that point at an object inside this file",
                        name,
                    )
            elif isinstance(link, h5py.HardLink):
                # Reached through hard links only (the walk does not follow others), so opening is safe.
                obj = self.f.get(name)
                if isinstance(obj, h5py.Dataset):
                    self._check_storage(obj, where, name)
            else:
                self.add(
                    "unsupported_link",
                    f"{where} is a {type(link).__name__}; expected hard or soft links only",
                    name,
                )
            return None

        self.f.visititems_links(visit)

    def _check_storage(self, ds: h5py.Dataset, where: str, name: str) -> None:
        external = ds.external
        if external:
            files = ", ".join(repr(attr_text(entry[0])) for entry in external)
            self.add(
                "external_storage",
                f"{where} keeps its raw data in external file(s) {files}; expected the "
                "data stored inside this HDF5 file",
                name,
            )
            self.unsafe.add(hash(ds.id))
        if ds.is_virtual:
            sources = ", ".join(
                sorted({f"{attr_text(s.file_name)!r}:{attr_text(s.dset_name)!r}" for s in ds.virtual_sources()})
            )
            self.add(
                "virtual_dataset",
                f"{where} is a virtual dataset mapping {sources}; expected the data "
                "stored inside this HDF5 file",
                name,
            )
            self.unsafe.add(hash(ds.id))

    def _resolve(self, path: str, base: str = "") -> tuple[str, Any, str]:
        """Follow ``path`` one link at a time, never through an external link.

        Returns ``(status, object, why)``: status ``ok``, ``missing`` or ``link`` (an unusable link on
        the way).
        """
        return self._resolve_from(self.f if path.startswith("/") else self._group(base), path, 0)

    def _group(self, base: str) -> Any:
        return self.f[base] if base else self.f

    def _resolve_from(self, node: Any, path: str, depth: int) -> tuple[str, Any, str]:
        if depth > MAX_SOFT_LINK_DEPTH:
            return "link", None, f"goes through more than {MAX_SOFT_LINK_DEPTH} soft links (a loop?)"
        for part in (p for p in path.split("/") if p and p != "."):
            if not isinstance(node, h5py.Group):
                return "missing", None, f"does not exist (a dataset has no member {part!r})"
            name = part.encode()
            links = node.id.links
            if not links.exists(name):
                return "missing", None, "does not exist in the file"
            kind = links.get_info(name).type
            if kind == h5py.h5l.TYPE_HARD:
                node = node[part]
            elif kind == h5py.h5l.TYPE_SOFT:
                target = attr_text(links.get_val(name))
                start = self.f if target.startswith("/") else node
                status, node, why = self._resolve_from(start, target, depth + 1)
                if status != "ok":
                    return "link", None, why
            elif kind == h5py.h5l.TYPE_EXTERNAL:
                return "link", None, f"leads out of the file through the external link {part!r}"
            else:
                return "link", None, f"goes through an unsupported link type at {part!r}"
        return "ok", node, ""


def attr_text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def key_list(group: h5py.Group, limit: int = 20) -> str:
    names = list(group.keys())
    listed = ", ".join(repr(n) for n in names[:limit])
    return (listed + (", …" if len(names) > limit else "")) or "none"

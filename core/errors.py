"""Exceptions raised by the model library, and the problem records they carry.

Hierarchy::

    GpuyardError                 base of every error gpuyard raises on purpose
    ├── SpecError                a job spec is invalid (carries every problem, not just the first)
    └── DataError                an HDF5 data set is refused (carries every reason)

Third-party errors (pydantic, h5py, Keras) are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input.

    Args:
        code: machine-readable reason, e.g. ``"missing_key"``, ``"external_link"``, ``"value_error"``.
        detail: a sentence naming the field or key, the value received and what was expected.
        field: dotted path of the spec field (``"architecture.depth"``) or the HDF5 key (``"X_train"``).
    """

    code: str
    detail: str
    field: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class GpuyardError(Exception):
    """Base class of gpuyard's own errors."""

    code = "gpuyard_error"

    def __init__(self, problems: list[Problem] | str) -> None:
        if isinstance(problems, str):
            problems = [Problem(self.code, problems)]
        self.problems: list[Problem] = list(problems)
        super().__init__("; ".join(p.detail for p in self.problems))

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.code, "detail": str(self), "problems": [p.to_dict() for p in self.problems]}


class SpecError(GpuyardError):
    """The job spec is invalid; ``problems`` lists every error found."""

    code = "spec_invalid"


class DataError(GpuyardError):
    """The HDF5 data set is refused; ``problems`` lists every reason found."""

    code = "dataset_invalid"

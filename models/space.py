"""A study's search space: spec fields by dotted path, each a choice, an int range or a float range.

Pure Python (no Keras, no Optuna): the API validates a space and checks its trials' specs with it, and
the study driver (``worker/studies.py``) turns Optuna's sampled values into a trial's spec with
:func:`apply_params`. Vocabulary::

    {"architecture.depth": {"choice": [2, 4]},                      # any JSON values, sub-objects too
     "architecture.width": {"int": [16, 256], "log": true},          # step n (default 1; not with log)
     "training.optimizer.learning_rate": {"float": [1e-4, 10], "log": true}}

A choice may hold whole sub-objects (``"architecture": {"choice": [{highway}, {snn}]}``); deeper paths are
applied on top of the chosen one (paths are applied shallowest first). A *point* maps every path to a
value; the *corners* of a space are its points with each range at an end and each choice at every value:
if every corner's spec passes the checks, so does every point between them (sizes grow with depth,
width and the like, monotonically).
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.errors import Problem, SpecError
from models.health import HEALTH_KINDS, LOSS_NOT_FINITE, VANISHING_GRADIENT

#: Most points a grid may have, and most corners a space may have (each one's spec is checked at submit).
MAX_GRID_POINTS = 1000
MAX_CORNERS = 256
MAX_CHOICES = 100
MAX_DIMENSIONS = 20
_SEGMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_PRIMITIVES = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Dimension:
    """One searched field. ``kind`` is ``choice`` (``choices``), ``int`` or ``float`` (``low``, ``high``,
    ``log``, ``step``)."""

    path: str
    kind: str
    choices: tuple[Any, ...] = ()
    low: float = 0
    high: float = 0
    log: bool = False
    step: int = 1

    @property
    def depth(self) -> int:
        return self.path.count(".")

    @property
    def by_index(self) -> bool:
        """Whether Optuna sees this choice as the index of its value (a value Optuna cannot store: a
        sub-object or a list) rather than the value itself."""
        return self.kind == "choice" and not all(isinstance(c, _PRIMITIVES) for c in self.choices)

    def corners(self) -> list[Any]:
        if self.kind == "choice":
            return list(self.choices)
        low, high = (int(self.low), int(self.high)) if self.kind == "int" else (self.low, self.high)
        if self.kind == "int" and self.step > 1:
            high = low + (high - low) // self.step * self.step
        return [low] if low == high else [low, high]

    def grid_size(self) -> int:
        """How many values :meth:`grid_values` has, without listing them (a range may be astronomically long)."""
        if self.kind == "choice":
            return len(self.choices)
        return (int(self.high) - int(self.low)) // self.step + 1

    def grid_values(self) -> list[Any]:
        """Every value a grid takes on this dimension (a float range has none: refused for a grid)."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int" and not self.log:
            return list(range(int(self.low), int(self.high) + 1, self.step))
        raise ValueError(f"{self.path}: a grid enumerates choices and int ranges without log, not a {self.kind}")


class SpaceError(SpecError):
    """A study's space (or its trial count) that cannot be searched; ``problems`` name every field and value."""

    code = "space_invalid"


def parse_space(space: Mapping[str, Any], *, grid: bool = False) -> list[Dimension]:
    """Validate a space (see the module's docstring) into its dimensions, shallowest path first.

    Args:
        space: ``{dotted path: {"choice": [...]} | {"int": [lo, hi], "log", "step"} | {"float": [lo, hi], "log"}}``.
        grid: the grid sampler's space: choices and int ranges without log only, at most
            :data:`MAX_GRID_POINTS` points.

    Raises:
        SpaceError: every problem, each naming ``space.<path>``, the value received and what was expected.
    """
    problems: list[Problem] = []
    if not isinstance(space, Mapping) or not space:
        raise SpaceError(
            [
                Problem(
                    "space_invalid", f"Expected a non-empty object of dotted paths. Received: space={space!r}", "space"
                )
            ]
        )
    if len(space) > MAX_DIMENSIONS:
        problems.append(
            Problem("space_invalid", f"Expected at most {MAX_DIMENSIONS} paths. Received: {len(space)}", "space")
        )
    dims: list[Dimension] = []
    for path, entry in space.items():
        dim = _dimension(path, entry, problems)
        if dim is None:
            continue
        if grid and dim.kind == "float":
            problems.append(
                _bad(
                    path,
                    entry,
                    "a grid searches choices and int ranges; a float range has no grid "
                    "(list the values as a choice, or use the random or tpe sampler)",
                )
            )
            continue
        if grid and dim.kind == "int" and dim.log:
            problems.append(_bad(path, entry, "a grid enumerates int ranges without log (list the values as a choice)"))
            continue
        dims.append(dim)
    paths = {d.path for d in dims}
    for dim in dims:
        for parent in _parents(dim.path):
            if parent in paths and next(d for d in dims if d.path == parent).kind != "choice":
                problems.append(
                    _bad(dim.path, space[dim.path], f"its parent {parent} is a range, not a choice of objects")
                )
    if grid and not problems:
        count = math.prod(d.grid_size() for d in dims)
        if count > MAX_GRID_POINTS:
            problems.append(
                Problem("space_too_large", f"the grid has {count} points; at most {MAX_GRID_POINTS}", "space")
            )
    if problems:
        raise SpaceError(problems)
    return sorted(dims, key=lambda d: (d.depth, d.path))


def _parents(path: str) -> Iterator[str]:
    parts = path.split(".")
    for i in range(1, len(parts)):
        yield ".".join(parts[:i])


def _bad(path: str, entry: Any, expected: str) -> Problem:
    return Problem("space_invalid", f"space.{path}: expected {expected}. Received: {_short(entry)}", f"space.{path}")


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _dimension(path: Any, entry: Any, problems: list[Problem]) -> Dimension | None:
    if not isinstance(path, str) or not all(_SEGMENT.match(s) for s in path.split(".")) or path.count(".") > 8:
        problems.append(
            Problem(
                "space_invalid",
                f"space: expected a dotted path of spec fields such as architecture.depth. Received: {_short(path)}",
                "space",
            )
        )
        return None
    kinds = [k for k in ("choice", "int", "float") if isinstance(entry, Mapping) and k in entry]
    if len(kinds) != 1:
        problems.append(_bad(path, entry, 'exactly one of {"choice": [...]}, {"int": [lo, hi]}, {"float": [lo, hi]}'))
        return None
    kind = kinds[0]
    extra = set(entry) - {kind, "log", "step"}
    if extra or (kind == "choice" and set(entry) != {"choice"}) or (kind == "float" and "step" in entry):
        problems.append(
            _bad(
                path,
                entry,
                f"only the keys {kind}{', log' if kind != 'choice' else ''}{', step' if kind == 'int' else ''}",
            )
        )
        return None
    if kind == "choice":
        choices = entry["choice"]
        if not isinstance(choices, list) or not 1 <= len(choices) <= MAX_CHOICES:
            problems.append(_bad(path, entry, f"a list of 1 to {MAX_CHOICES} values"))
            return None
        return Dimension(path, "choice", choices=tuple(choices))
    bounds, log, step = entry[kind], entry.get("log", False), entry.get("step", 1)
    integral = kind == "int"
    if (
        not isinstance(bounds, list)
        or len(bounds) != 2
        or not all(_number(b) and (not integral or isinstance(b, int)) for b in bounds)
        or bounds[0] > bounds[1]
    ):
        problems.append(_bad(path, entry, f"[lo, hi], two {'integers' if integral else 'numbers'} with lo <= hi"))
        return None
    if not isinstance(log, bool):
        problems.append(_bad(path, entry, "log: true or false"))
        return None
    if log and bounds[0] <= 0:
        problems.append(_bad(path, entry, "lo > 0 with log: true"))
        return None
    if integral and (not isinstance(step, int) or isinstance(step, bool) or step < 1 or (log and step != 1)):
        problems.append(_bad(path, entry, "step: an integer >= 1 (and 1 with log: true)"))
        return None
    return Dimension(path, kind, low=bounds[0], high=bounds[1], log=log, step=step)


def apply_params(base: Mapping[str, Any], dims: list[Dimension], point: Mapping[str, Any]) -> dict[str, Any]:
    """The spec of one point: ``base`` with each dimension's value set at its path, shallowest first.

    Missing objects on a path are created; a path through something that is not an object is refused.

    Raises:
        SpaceError: a path that runs through a value that is not an object.
    """
    spec = copy.deepcopy(dict(base))
    for dim in dims:
        node: dict[str, Any] = spec
        parts = dim.path.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpaceError(
                    [_bad(dim.path, point.get(dim.path), f"an object at {part}, which holds {_short(child)}")]
                )
            node = child
        node[parts[-1]] = copy.deepcopy(point[dim.path])
    return spec


def grid_points(dims: list[Dimension]) -> list[dict[str, Any]]:
    """Every point of a grid, in a fixed order (the last path varies fastest)."""
    return [
        dict(zip([d.path for d in dims], values, strict=True))
        for values in itertools.product(*(d.grid_values() for d in dims))
    ]


def corner_points(dims: list[Dimension]) -> list[dict[str, Any]]:
    """Every corner of the space (each range at its ends, each choice at every value).

    Raises:
        SpaceError: more than :data:`MAX_CORNERS` corners (too many specs to check at submit).
    """
    count = math.prod(len(d.corners()) for d in dims)
    if count > MAX_CORNERS:
        raise SpaceError(
            [
                Problem(
                    "space_too_large",
                    f"the space has {count} corners to check; at most {MAX_CORNERS} (fewer choices, or fewer paths)",
                    "space",
                )
            ]
        )
    return [
        dict(zip([d.path for d in dims], values, strict=True))
        for values in itertools.product(*(d.corners() for d in dims))
    ]


def distribution_key(dim: Dimension) -> Any:
    """The Optuna categorical choices of a choice dimension: its values, or their indices (:attr:`by_index`)."""
    return list(range(len(dim.choices))) if dim.by_index else list(dim.choices)


def value_of(dim: Dimension, sampled: Any) -> Any:
    """The spec value of what Optuna sampled for ``dim`` (an index becomes the choice it names)."""
    if dim.by_index:
        return dim.choices[int(sampled)]
    return sampled


def point_label(point: Mapping[str, Any]) -> str:
    """A point in a few words, for errors: ``architecture.width=100000, architecture.depth=4``."""
    return ", ".join(f"{path}={_short(value, 40)}" for path, value in point.items())


# ── the study as submitted ───────────────────────────────────────────────────────────────────────────────
SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("median", "hyperband", "none")
#: The health kinds that prune a trial by default: for the random and TPE samplers (a grid studies them).
DEFAULT_PRUNE_ON = (LOSS_NOT_FINITE, VANISHING_GRADIENT)
MAX_TRIALS = 1000


class Objective(BaseModel):
    """What a study optimizes: a per-epoch metric of the trial's epoch_end events (``loss`` or a key of
    their ``metrics``: ``accuracy``, ``val_accuracy``, ``val_loss``, ...), and which way."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field("val_accuracy", min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    direction: Literal["maximize", "minimize"] = "maximize"


class StudyRequest(BaseModel):
    """A study: a base spec, a space over its fields and an objective (docs/studies.md)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    dataset: str = Field(min_length=1, max_length=64)
    spec: dict[str, Any]
    space: dict[str, Any]
    objective: Objective = Field(default_factory=Objective)
    sampler: Literal["grid", "random", "tpe"] = "tpe"
    trials: int | None = Field(None, ge=1, le=MAX_TRIALS, description="Default: every point of a grid.")
    max_parallel: int = Field(4, ge=1, le=64)
    pruner: Literal["median", "hyperband", "none"] = "median"
    seed: int = Field(0, ge=0, le=2**31 - 1)
    prune_on: list[str] | None = Field(
        None,
        description="Health kinds that prune a trial at once. Default: loss_not_finite and "
        "vanishing_gradient for random and tpe, none for grid.",
    )
    priority: int = Field(0, ge=-100, le=100)

    @field_validator("prune_on")
    @classmethod
    def _known_kinds(cls, kinds: list[str] | None) -> list[str] | None:
        for kind in kinds or []:
            if kind not in HEALTH_KINDS:
                raise ValueError(f"Expected health kinds among {', '.join(HEALTH_KINDS)}. Received: {kind!r}")
        return kinds

    def prune_kinds(self) -> list[str]:
        """The health kinds that prune a trial (the default for the sampler when none are given)."""
        if self.prune_on is not None:
            return list(self.prune_on)
        return [] if self.sampler == "grid" else list(DEFAULT_PRUNE_ON)

    def dimensions(self) -> list[Dimension]:
        """The parsed space (:func:`parse_space`). Raises SpaceError."""
        return parse_space(self.space, grid=self.sampler == "grid")

    def trial_count(self, dims: list[Dimension]) -> int:
        """How many trials the study runs: ``trials``, at most every point of a grid.

        Raises:
            SpaceError: no ``trials`` for a random or TPE study.
        """
        if self.sampler == "grid":
            points = math.prod(d.grid_size() for d in dims)
            return min(points, self.trials or points)
        if self.trials is None:
            raise SpaceError(
                [Problem("trials_missing", f"a {self.sampler} study needs trials: how many to run", "trials")]
            )
        return self.trials

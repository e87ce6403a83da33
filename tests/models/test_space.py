"""A study's search space (models/space.py): parsing, refusals naming the path, points, corners, specs."""

from __future__ import annotations

from typing import Any

import pytest

from models.space import (
    MAX_CORNERS,
    Dimension,
    SpaceError,
    StudyRequest,
    apply_params,
    corner_points,
    distribution_key,
    grid_points,
    parse_space,
    value_of,
)


@pytest.mark.parametrize(
    ("space", "grid", "expected"),
    [
        ({"a.b": {"choice": [1, 2]}}, False, [Dimension("a.b", "choice", choices=(1, 2))]),
        ({"a": {"int": [1, 8], "step": 2}}, True, [Dimension("a", "int", low=1, high=8, step=2)]),
        ({"a": {"int": [1, 64], "log": True}}, False, [Dimension("a", "int", low=1, high=64, log=True)]),
        ({"lr": {"float": [1e-4, 10], "log": True}}, False, [Dimension("lr", "float", low=1e-4, high=10, log=True)]),
        # shallowest first: a chosen sub-object, then a field varied on top of it
        (
            {"architecture.depth": {"choice": [2]}, "architecture": {"choice": [{"family": "snn"}]}},
            True,
            [
                Dimension("architecture", "choice", choices=({"family": "snn"},)),
                Dimension("architecture.depth", "choice", choices=(2,)),
            ],
        ),
    ],
)
def test_parse_space(space: dict[str, Any], grid: bool, expected: list[Dimension]) -> None:
    assert parse_space(space, grid=grid) == expected


@pytest.mark.parametrize(
    ("space", "grid", "field", "says"),
    [
        ({}, False, "space", "non-empty"),
        ({"a": {"choice": []}}, False, "space.a", "a list of 1 to"),
        ({"a": {"choice": [1], "log": True}}, False, "space.a", "only the keys"),
        ({"a": {"int": [3, 1]}}, False, "space.a", "lo <= hi"),
        ({"a": {"int": [1.5, 3]}}, False, "space.a", "two integers"),
        ({"a": {"float": [0, 1], "log": True}}, False, "space.a", "lo > 0"),
        ({"a": {"int": [1, 9], "log": True, "step": 2}}, False, "space.a", "step"),
        ({"a": {"float": [0, 1], "step": 2}}, False, "space.a", "only the keys"),
        ({"a": {"int": [1, 2], "choice": [1]}}, False, "space.a", "exactly one of"),
        ({"a b": {"choice": [1]}}, False, "space", "dotted path"),
        ({"a": {"float": [0.1, 1]}}, True, "space.a", "no grid"),
        ({"a": {"int": [1, 8], "log": True}}, True, "space.a", "without log"),
        ({"a": {"int": [0, 2000]}}, True, "space", "2001 points"),
        ({"a": {"int": [0, 10**18]}, "b": {"choice": [1, 2]}}, True, "space", "2000000000000000002 points"),
        ({"a": {"int": [1, 4]}, "a.b": {"choice": [1]}}, False, "space.a.b", "is a range"),
    ],
)
def test_bad_spaces_are_refused_naming_the_path(space: dict[str, Any], grid: bool, field: str, says: str) -> None:
    with pytest.raises(SpaceError) as caught:
        parse_space(space, grid=grid)
    problem = caught.value.problems[0]
    assert problem.field == field and says in problem.detail, problem


def test_grid_points_and_corners() -> None:
    dims = parse_space({"d": {"choice": [2, 4]}, "w": {"int": [32, 64], "step": 32}}, grid=True)
    assert grid_points(dims) == [{"d": 2, "w": 32}, {"d": 2, "w": 64}, {"d": 4, "w": 32}, {"d": 4, "w": 64}]
    ranges = parse_space({"w": {"int": [16, 100000], "log": True}, "lr": {"float": [1e-4, 10]}})
    assert corner_points(ranges) == [
        {"lr": 1e-4, "w": 16},
        {"lr": 1e-4, "w": 100000},
        {"lr": 10, "w": 16},
        {"lr": 10, "w": 100000},
    ]
    # a stepped int range's upper corner is the last value the step reaches
    assert parse_space({"w": {"int": [1, 10], "step": 4}})[0].corners() == [1, 9]


def test_too_many_corners_are_refused() -> None:
    dims = parse_space({f"p{i}": {"choice": [1, 2, 3]} for i in range(6)})  # 729 corners
    assert MAX_CORNERS < 3**6
    with pytest.raises(SpaceError, match="corners"):
        corner_points(dims)


def test_apply_params_sets_sub_objects_then_fields_on_top() -> None:
    dims = parse_space(
        {
            "architecture": {"choice": [{"family": "highway", "depth": 2}, {"family": "snn", "widths": [8]}]},
            "architecture.depth": {"choice": [3]},
            "training.optimizer.learning_rate": {"float": [0.1, 1]},
        }
    )
    base = {"architecture": {"family": "mlp"}, "training": {"epochs": 2}}
    point = {
        "architecture": {"family": "snn", "widths": [8]},
        "architecture.depth": 3,
        "training.optimizer.learning_rate": 0.5,
    }
    spec = apply_params(base, dims, point)
    assert spec == {
        "architecture": {"family": "snn", "widths": [8], "depth": 3},
        "training": {"epochs": 2, "optimizer": {"learning_rate": 0.5}},
    }
    assert base == {"architecture": {"family": "mlp"}, "training": {"epochs": 2}}  # the base is left alone
    with pytest.raises(SpaceError, match="an object at training"):
        apply_params({"training": 3}, dims, point)


def test_choices_of_objects_go_to_optuna_as_indices() -> None:
    objects, plain = parse_space({"a": {"choice": [{"x": 1}, {"x": 2}]}, "b": {"choice": ["relu", None, 2.5]}})
    assert (distribution_key(objects), distribution_key(plain)) == ([0, 1], ["relu", None, 2.5])
    assert (value_of(objects, 1), value_of(plain, "relu")) == ({"x": 2}, "relu")


@pytest.mark.parametrize(
    ("body", "trials"),
    [
        ({"sampler": "grid", "space": {"a": {"choice": [1, 2, 3]}, "b": {"choice": [1, 2]}}}, 6),
        ({"sampler": "grid", "trials": 4, "space": {"a": {"choice": [1, 2, 3]}, "b": {"choice": [1, 2]}}}, 4),
        ({"sampler": "grid", "trials": 40, "space": {"a": {"choice": [1, 2, 3]}}}, 3),
        ({"sampler": "random", "trials": 12, "space": {"a": {"float": [1e-4, 10], "log": True}}}, 12),
    ],
)
def test_trial_count(body: dict[str, Any], trials: int) -> None:
    request = StudyRequest.model_validate({"name": "s", "dataset": "d", "spec": {}, **body})
    assert request.trial_count(request.dimensions()) == trials


def test_a_random_study_needs_a_trial_count() -> None:
    request = StudyRequest.model_validate(
        {"name": "s", "dataset": "d", "spec": {}, "sampler": "tpe", "space": {"a": {"choice": [1]}}}
    )
    with pytest.raises(SpaceError) as caught:
        request.trial_count(request.dimensions())
    assert caught.value.problems[0].field == "trials"

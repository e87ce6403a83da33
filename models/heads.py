"""The output layer, loss and metrics: taken from the spec where given, else inferred from the data set.

No Keras import: the dry run and the service can resolve a head without a framework.

* ``integer_labels``: softmax over num_classes, ``sparse_categorical_crossentropy``, ``["accuracy"]``
* ``one_hot``: softmax over num_classes, ``categorical_crossentropy``, ``["accuracy"]``
* ``regression``: linear with output_dim units, ``mean_squared_error``, ``["mean_absolute_error"]``
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.errors import Problem, SpecError
from models.data.summary import DatasetSummary
from models.spec import JobSpec
from models.vocabulary import CLASSIFICATION_METRICS

DEFAULT_LOSS = {
    "integer_labels": "sparse_categorical_crossentropy",
    "one_hot": "categorical_crossentropy",
    "regression": "mean_squared_error",
}
DEFAULT_ACTIVATION = {"integer_labels": "softmax", "one_hot": "softmax", "regression": "linear"}
DEFAULT_METRICS = {
    "integer_labels": ["accuracy"],
    "one_hot": ["accuracy"],
    "regression": ["mean_absolute_error"],
}
# Losses that only make sense with one kind of target; the others accept any numeric target.
_LOSS_TARGETS = {
    "sparse_categorical_crossentropy": ("integer_labels",),
    "categorical_crossentropy": ("one_hot",),
    "categorical_hinge": ("one_hot",),
    "kl_divergence": ("one_hot", "regression"),
}
_METRIC_TARGETS = {
    "sparse_categorical_accuracy": ("integer_labels",),
    "sparse_top_k_categorical_accuracy": ("integer_labels",),
    "categorical_accuracy": ("one_hot",),
    "top_k_categorical_accuracy": ("one_hot",),
}


@dataclass(frozen=True)
class Head:
    """The resolved output layer and training objective.

    Args:
        activation: the output Dense layer's activation.
        units: its units.
        loss: the full Keras loss name.
        metrics: full Keras metric names.
        warnings: doubtful but allowed choices, for the dry run.
    """

    activation: str
    units: int
    loss: str
    metrics: list[str]
    warnings: list[Problem] = field(default_factory=list)


def resolve_head(spec: JobSpec, summary: DatasetSummary) -> Head:
    """The output layer, loss and metrics for ``spec`` on the data ``summary`` describes.

    Args:
        spec: the validated job spec.
        summary: the checked data set's summary.

    Returns:
        The head: spec values where given, defaults following ``summary.target`` otherwise.

    Raises:
        SpecError: when the spec's output, loss or metrics contradict the data, listing every problem.
    """
    target = summary.target
    problems: list[Problem] = []
    warnings: list[Problem] = []

    units = spec.output.units if spec.output.units is not None else summary.output_dim
    if units != summary.output_dim:
        problems.append(
            Problem(
                "output_mismatch",
                f"output.units: the data's {target} target needs {summary.output_dim} output units. "
                f"Received: units={units}",
                "output.units",
            )
        )
    activation = spec.output.activation or DEFAULT_ACTIVATION[target]
    if target == "regression" and activation == "softmax":
        warnings.append(
            Problem(
                "output_doubtful",
                "output.activation: softmax on a regression target forces the outputs to sum to 1. "
                "Received: activation='softmax'",
                "output.activation",
            )
        )
    crossentropy = spec.loss is None or "crossentropy" in spec.loss
    sigmoid_binary = activation == "sigmoid" and spec.loss == "binary_crossentropy"
    if target != "regression" and crossentropy and activation != "softmax" and not sigmoid_binary:
        problems.append(
            Problem(
                "output_mismatch",
                f"output.activation: a {target} target with a crossentropy loss needs 'softmax' "
                f"(or 'sigmoid' with binary_crossentropy). Received: activation={activation!r}",
                "output.activation",
            )
        )

    loss = spec.loss or DEFAULT_LOSS[target]
    allowed = _LOSS_TARGETS.get(loss)
    if allowed is not None and target not in allowed:
        problems.append(
            Problem(
                "loss_mismatch",
                f"loss: {loss} needs a {' or '.join(allowed)} target; the data's Y_train is {target} "
                f"(for that target use {DEFAULT_LOSS[target]}). Received: loss={loss!r}",
                "loss",
            )
        )
    if loss == "binary_crossentropy" and target == "integer_labels" and summary.output_dim > 1:
        problems.append(
            Problem(
                "loss_mismatch",
                f"loss: binary_crossentropy needs 0/1 targets per output unit; the data has "
                f"{summary.num_classes} integer classes (use sparse_categorical_crossentropy). "
                f"Received: loss={loss!r}",
                "loss",
            )
        )

    metrics = spec.metrics if spec.metrics is not None else list(DEFAULT_METRICS[target])
    for index, metric in enumerate(metrics):
        if target == "regression" and metric in CLASSIFICATION_METRICS:
            problems.append(
                Problem(
                    "metric_mismatch",
                    f"metrics.{index}: {metric} needs a classification target; the data's Y_train is "
                    f"regression. Received: metrics[{index}]={metric!r}",
                    f"metrics.{index}",
                )
            )
        elif metric in _METRIC_TARGETS and target not in _METRIC_TARGETS[metric]:
            problems.append(
                Problem(
                    "metric_mismatch",
                    f"metrics.{index}: {metric} needs a {_METRIC_TARGETS[metric][0]} target; the data's "
                    f"Y_train is {target} (use 'accuracy'). Received: metrics[{index}]={metric!r}",
                    f"metrics.{index}",
                )
            )
    if problems:
        raise SpecError(problems)
    return Head(activation=activation, units=units, loss=loss, metrics=metrics, warnings=warnings)

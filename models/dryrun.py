"""Dry run of a job spec: every error, warnings, the layer table, parameters and a memory estimate.

:func:`dry_run` never raises for a bad spec: it reports. It builds the model (on the CPU, without
data) to count parameters and shapes, so it imports Keras; run it in the trainer's process or a child
process, never in the web service.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import keras
import numpy as np

from core.errors import Problem, SpecError
from models.blocks.snn import snn_warnings
from models.build import build_model, needs_input_stats
from models.data.summary import DatasetSummary
from models.heads import resolve_head
from models.health import predict_health
from models.size import ModelSize, model_size, optimizer_slots, training_memory
from models.spec import JobSpec, KerasJsonArchitecture, SnnArchitecture, parse_spec


def _spec_warnings(spec: JobSpec, summary: DatasetSummary | None) -> list[Problem]:
    arch = spec.architecture
    warnings = snn_warnings(arch) if isinstance(arch, SnnArchitecture) else []
    if isinstance(arch, KerasJsonArchitecture) and spec.output.activation is not None:
        warnings.append(
            Problem(
                "output_ignored",
                "output.activation: a keras_json model keeps its own output layer; the value is ignored. "
                f"Received: activation={spec.output.activation!r}",
                "output.activation",
            )
        )
    training = spec.training
    has_val = summary is not None and summary.has("val")
    if has_val and training.validation_split > 0:
        warnings.append(
            Problem(
                "validation_split_ignored",
                "training.validation_split: the data set has its own X_val/Y_val, which wins; the split is "
                f"not used. Received: validation_split={training.validation_split}",
                "training.validation_split",
            )
        )
    stopping = training.early_stopping
    if (
        stopping is not None
        and stopping.monitor.startswith("val_")
        and summary is not None
        and not has_val
        and training.validation_split == 0
    ):
        warnings.append(
            Problem(
                "no_validation_data",
                f"training.early_stopping.monitor: {stopping.monitor!r} needs validation data, but the data "
                "set has no X_val/Y_val and training.validation_split is 0. "
                f"Received: monitor={stopping.monitor!r}",
                "training.early_stopping.monitor",
            )
        )
    return warnings


def _keras_json_input_shape(arch: KerasJsonArchitecture) -> list[int] | None:
    """The input shape declared in a keras_json model's first InputLayer, if any."""
    stack: list[Any] = [arch.config()]
    while stack:
        node = stack.pop(0)
        if isinstance(node, dict):
            if node.get("class_name") == "InputLayer" and isinstance(node.get("config"), dict):
                shape = node["config"].get("batch_shape") or node["config"].get("batch_input_shape")
                if isinstance(shape, list) and all(isinstance(d, int) for d in shape[1:]):
                    return list(shape[1:])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


def declared_summary(spec: JobSpec) -> tuple[DatasetSummary | None, list[Problem], list[Problem]]:
    """A stand-in data summary from what the spec declares, for a dry run without a data set.

    The input shape comes from ``architecture.input_shape`` (or a keras_json model's InputLayer), the
    output units from ``output.units``; the target kind from the loss (integer labels unless the loss
    or a non-softmax output say otherwise).

    Args:
        spec: the validated job spec.

    Returns:
        ``(summary or None, errors, warnings)``.
    """
    arch = spec.architecture
    errors = []
    input_shape = arch.input_shape
    if input_shape is None and isinstance(arch, KerasJsonArchitecture):
        input_shape = _keras_json_input_shape(arch)
    if input_shape is None:
        errors.append(
            Problem(
                "data_needed",
                "architecture.input_shape: without a data set, a dry run needs the per-sample input shape "
                "declared here (or give a data set). Received: nothing",
                "architecture.input_shape",
            )
        )
    if spec.output.units is None:
        errors.append(
            Problem(
                "data_needed",
                "output.units: without a data set, a dry run needs the output units declared here "
                "(or give a data set). Received: nothing",
                "output.units",
            )
        )
    if errors or input_shape is None:
        return None, errors, []
    if spec.loss == "sparse_categorical_crossentropy" or (
        spec.loss is None and spec.output.activation in (None, "softmax")
    ):
        target = "integer_labels"
    elif spec.loss in ("categorical_crossentropy", "categorical_hinge"):
        target = "one_hot"
    else:
        target = "regression"
    summary = DatasetSummary(
        sha256="",
        size_bytes=0,
        keys=spec.data,
        arrays={},
        rows={},
        input_shape=list(input_shape),
        target=target,
        num_classes=spec.output.units if target != "regression" else None,
        output_dim=spec.output.units,
    )
    warning = Problem(
        "no_data",
        f"No data set given: checked against the declared input shape {list(input_shape)} and target kind "
        f"{target!r} with {spec.output.units} output units.",
    )
    return summary, [], [warning]


def _layer_table(model: keras.Model) -> list[dict[str, Any]]:
    rows = []
    for layer in model.layers:
        try:
            shape = list(layer.output.shape)
        except (AttributeError, ValueError):  # a layer used more than once has no single output
            shape = None
        rows.append(
            {
                "name": layer.name,
                "class": type(layer).__name__,
                "output_shape": shape,
                "parameters": int(layer.count_params()),
            }
        )
    return rows


def _count(weights: list[Any]) -> int:
    return int(sum(math.prod(w.shape) for w in weights))


def memory_estimate(
    model: keras.Model, spec: JobSpec, layers: list[dict[str, Any]], size: ModelSize | None = None
) -> dict[str, Any]:
    """Bytes one training step needs, broken down (see the ``note`` in the result).

    Args:
        model: the built model.
        spec: the job spec (batch size, optimizer).
        layers: the layer table from the dry run (output shapes).
        size: the submit-time estimate (``models.size.model_size``) of the same model: its activations are
            the ones the limits were checked with (they include what a layer keeps besides its output:
            attention scores, recurrent gates), so submit and dry run report one number. None: count
            the layer table's outputs.

    Returns:
        ``{"weights", "gradients", "optimizer_state", "input_batch", "activations_per_batch", "total",
        "batch_size", "note"}``, sizes in bytes.
    """
    trainable = _count(model.trainable_weights)
    per_sample = sum(
        math.prod(d for d in row["output_shape"][1:] if d is not None)
        for row in layers
        if row["output_shape"] and row["class"] != "InputLayer"
    )
    io_per_sample = sum(math.prod(t.shape[1:]) for t in model.inputs) + sum(
        math.prod(t.shape[1:]) for t in model.outputs
    )
    if size is not None:
        per_sample, io_per_sample = size.activations_per_sample, size.io_per_sample
    return training_memory(
        parameters=_count(model.weights),
        trainable=trainable,
        slots=optimizer_slots(spec),
        batch_size=spec.training.batch_size,
        io_per_sample=io_per_sample,
        activations_per_sample=per_sample,
        itemsize=np.dtype(keras.config.floatx()).itemsize,
    )


def dry_run(spec_obj: JobSpec | dict[str, Any], summary: DatasetSummary | None) -> dict[str, Any]:
    """Check a spec against a data set (or its declared input) without training.

    Args:
        spec_obj: the validated spec, or the spec as decoded JSON (validated here, its errors reported).
        summary: the checked data set's summary; None to use the spec's declared ``input_shape`` and
            ``output.units``.

    Returns:
        ``{"ok", "errors", "warnings", "parameters": {"total", "trainable", "non_trainable"},
        "layers": [{"name", "class", "output_shape", "parameters"}], "memory_estimate_bytes", "health"}``;
        errors and warnings are problem dicts (``code``, ``detail``, ``field``), ALL of them.
        ``parameters``, ``layers`` and ``memory_estimate_bytes`` are empty when the model could not
        be built. ``health``: the health findings predictable from the spec alone
        (:func:`models.health.predict_health`), each also listed as a warning.
    """
    result: dict[str, Any] = {
        "ok": False,
        "errors": [],
        "warnings": [],
        "parameters": None,
        "layers": [],
        "memory_estimate_bytes": None,
        "health": [],
    }
    if isinstance(spec_obj, JobSpec):
        spec = spec_obj
    else:
        try:
            spec = parse_spec(spec_obj)
        except SpecError as exc:
            result["errors"] = [p.to_dict() for p in exc.problems]
            return result

    errors: list[Problem] = []
    warnings: list[Problem] = []
    if summary is None:
        summary, errors, warnings = declared_summary(spec)
    warnings += _spec_warnings(spec, summary)
    result["health"] = predict_health(spec)
    warnings += [
        Problem(f["kind"], f"{f['detail']} Remedy: {f['remedy']}", "architecture.activation") for f in result["health"]
    ]
    if summary is not None:
        with contextlib.suppress(SpecError):  # build_model reports these problems with the others
            warnings += resolve_head(spec, summary).warnings
        features = summary.input_shape[-1] if summary.input_shape else 1
        stats = (np.zeros(features, np.float32), np.ones(features, np.float32)) if needs_input_stats(spec) else None
        try:
            model = build_model(spec, summary, input_stats=stats)
        except SpecError as exc:
            errors += exc.problems
        except Exception as exc:  # a spec that passed our checks but that Keras still rejects
            errors.append(Problem("build_failed", f"Keras could not build the model: {type(exc).__name__}: {exc}"))
        else:
            layers = _layer_table(model)
            trainable = _count(model.trainable_weights)
            total = _count(model.weights)
            result["parameters"] = {
                "total": total,
                "trainable": trainable,
                "non_trainable": total - trainable,
            }
            result["layers"] = layers
            size = model_size(spec, list(summary.input_shape), summary.output_dim)
            result["memory_estimate_bytes"] = memory_estimate(model, spec, layers, size)
            del model
    result["ok"] = not errors
    result["errors"] = [p.to_dict() for p in errors]
    result["warnings"] = [p.to_dict() for p in warnings]
    return result

"""Job spec + data-set summary → a compiled Keras 3 functional model of built-in layers only.

The model saves to ``.h5`` and loads with plain ``keras.models.load_model(path)`` (safe mode,
compile=True, no custom objects): losses and metrics are stored under full names, preprocessing
(``Normalization`` with the training data's statistics, ``Rescaling``) lives inside the model.

Layer names group into blocks by prefix (``input_*``, ``dense3_*``, ``highway2_*``,
``stage2_block1_*``, ``output``); :func:`layer_blocks` returns that grouping for diagnostics.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from core.errors import SpecError
from models.blocks import to_image
from models.blocks.cnn import cnn_body
from models.blocks.highway import highway_body
from models.blocks.keras_json import keras_json_model
from models.blocks.mlp import mlp_body
from models.blocks.resnet import resnet_conv_body, resnet_dense_body
from models.blocks.snn import snn_body
from models.data.summary import DatasetSummary
from models.fit import IMAGE_FAMILIES, spec_data_problems
from models.heads import resolve_head
from models.spec import (
    CnnArchitecture,
    HighwayArchitecture,
    JobSpec,
    KerasJsonArchitecture,
    MlpArchitecture,
    ResnetConvArchitecture,
    ResnetDenseArchitecture,
    SnnArchitecture,
)

_BODIES: dict[type, Callable[[keras.KerasTensor, Any], keras.KerasTensor]] = {
    MlpArchitecture: mlp_body,
    HighwayArchitecture: highway_body,
    ResnetDenseArchitecture: resnet_dense_body,
    ResnetConvArchitecture: resnet_conv_body,
    SnnArchitecture: snn_body,
    CnnArchitecture: cnn_body,
}
# Keras walks a functional graph recursively (``keras/src/ops/function.py`` ``_build_map_helper``, one
# Python frame per node on the longest path) when a model is built or loaded: a highway of 1000 blocks
# is ~5000 nodes deep, a bottleneck resnet of 1000 blocks ~10000, past Python's default limit of 1000.
# Python 3.11+ keeps Python-to-Python calls off the C stack, so a higher limit costs heap, not a crash.
DEEP_GRAPH_RECURSION_LIMIT = 50_000


def allow_deep_graphs() -> None:
    """Let this process build and load models as deep as the spec's limits allow (GPUYARD_MAX_MODEL_DEPTH).

    Called before every build and load of a model (build_model, the trainer's resume, model operations).
    """
    if sys.getrecursionlimit() < DEEP_GRAPH_RECURSION_LIMIT:
        sys.setrecursionlimit(DEEP_GRAPH_RECURSION_LIMIT)


_BLOCK_PATTERN = re.compile(r"^(stage\d+_block\d+|[a-z]+\d+|input|proj|stem|pool|flatten|output)(?:_|$)")


def needs_input_stats(spec: JobSpec) -> bool:
    """Whether :func:`build_model` needs the training data's statistics (``input_normalization``
    ``"standardize"``, always for an SNN)."""
    return spec.architecture.input_normalization == "standardize"


def compute_input_stats(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of the training inputs along the last axis, as Normalization layer takes them.

    Constant features (variance 0, e.g. the always-blank border pixels of digits) get variance 1, so
    they map to 0 instead of being divided by ~0 when a test sample differs.

    Args:
        x_train: training inputs, (rows, ..., features).

    Returns:
        ``(mean, variance)``, each float32 of shape ``(features,)``.

    Raises:
        ValueError: if ``x_train`` has no rows or no feature axis.
    """
    x = np.asarray(x_train, dtype=np.float64)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"Expected training inputs of shape (rows, ..., features). Received: shape={x.shape}")
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axis=axes)
    variance = x.var(axis=axes)
    variance[variance <= 1e-12] = 1.0
    return mean.astype(np.float32), variance.astype(np.float32)


def make_optimizer(spec: JobSpec) -> keras.optimizers.Optimizer:
    """The Keras optimizer the spec's ``training.optimizer`` describes.

    Args:
        spec: the validated job spec.

    Returns:
        A fresh optimizer instance.
    """
    opt = spec.training.optimizer
    if opt.name == "sgd":
        return keras.optimizers.SGD(learning_rate=opt.learning_rate, momentum=opt.momentum, nesterov=opt.nesterov)
    if opt.name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=opt.learning_rate)
    return keras.optimizers.Adam(learning_rate=opt.learning_rate)


def _preprocess(
    inputs: keras.KerasTensor,
    spec: JobSpec,
    stats: tuple[np.ndarray, np.ndarray] | None,
) -> keras.KerasTensor:
    arch = spec.architecture
    x = inputs
    features = inputs.shape[-1]
    if arch.input_normalization == "standardize":
        if stats is None:
            raise ValueError("input_normalization='standardize' needs input_stats: pass compute_input_stats(x_train)")
        mean, variance = (np.asarray(s, dtype=np.float32).reshape(-1) for s in stats)
        if mean.shape != (features,) or variance.shape != (features,):
            raise ValueError(
                f"input_stats must hold {features} means and variances (the input's last axis). "
                f"Received: mean shape {mean.shape}, variance shape {variance.shape}"
            )
        x = keras.layers.Normalization(mean=mean, variance=variance, name="input_normalization")(x)
    elif arch.input_normalization == "rescale":
        x = keras.layers.Rescaling(arch.input_scale, name="input_rescale")(x)
    if type(arch) in IMAGE_FAMILIES:
        x = to_image(x)
    return x


def build_model(
    spec: JobSpec,
    summary: DatasetSummary,
    *,
    input_stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> keras.Model:
    """Build and compile the spec's model for the data set ``summary`` describes.

    Seeds Keras with ``spec.training.seed`` first, so the same spec gives the same initial weights.

    Args:
        spec: the validated job spec.
        summary: the checked data set's summary (input shape, target kind, output units).
        input_stats: ``(mean, variance)`` of the training inputs from :func:`compute_input_stats`; required
            when :func:`needs_input_stats` is true, stored in the model's Normalization layer.

    Returns:
        A compiled functional (or, for ``keras_json``, the given Sequential/Functional) model.

    Raises:
        SpecError: every way the spec does not fit the data (shapes, output units, loss vs target, a
            refused keras_json class).
        ValueError: ``input_stats`` missing or of the wrong shape when standardizing.
    """
    arch = spec.architecture
    input_shape = list(summary.input_shape)
    problems = spec_data_problems(spec, summary)
    if problems:
        raise SpecError(problems)
    head = resolve_head(spec, summary)

    allow_deep_graphs()
    keras.utils.set_random_seed(spec.training.seed)
    if isinstance(arch, KerasJsonArchitecture):
        model = keras_json_model(arch, input_shape, summary.output_dim)
    else:
        inputs = keras.Input(shape=tuple(input_shape), name="input")
        x = _preprocess(inputs, spec, input_stats)
        x = _BODIES[type(arch)](x, arch)
        outputs = keras.layers.Dense(head.units, activation=head.activation, name="output")(x)
        model = keras.Model(inputs, outputs, name=_model_name(spec))
    model.compile(optimizer=make_optimizer(spec), loss=head.loss, metrics=list(head.metrics))
    return model


def _model_name(spec: JobSpec) -> str:
    name = re.sub(r"[^A-Za-z0-9_]+", "_", spec.name or "").strip("_")
    return name or spec.architecture.family


def block_of(layer_name: str) -> str:
    """The block a layer belongs to: ``stage2_block1`` for ``stage2_block1_1_conv``, ``highway3`` for
    ``highway3_t``; a layer that follows no naming scheme (keras_json) is its own block."""
    match = _BLOCK_PATTERN.match(layer_name)
    return match.group(1) if match else layer_name


def layer_blocks(model: keras.Model) -> dict[str, list[str]]:
    """Group a model's layers into blocks by name prefix, for per-block diagnostics.

    Args:
        model: a model from :func:`build_model` (or any model: unknown names become one-layer blocks).

    Returns:
        Block name → layer names, blocks and layers in model order.
    """
    blocks: dict[str, list[str]] = {}
    for layer in model.layers:
        blocks.setdefault(block_of(layer.name), []).append(layer.name)
    return blocks

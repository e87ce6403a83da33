"""How big a spec's model is, from the spec alone: parameters, activations, training memory, limits.

No Keras import: the API checks a submitted spec against the lab's limits (``core.settings``
``max_model_*``) before anything is built. The counts follow the builders in ``models.blocks`` layer by
layer, so they equal what Keras counts for the built model (tests/models/test_size.py checks this);
:func:`training_memory` is THE memory formula, also used by the dry run on the built model.

Depth and width bounds are checked first, so a spec with ``depth=10**9`` is refused without a loop of
that length.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from core.errors import Problem, SpecError
from models.keras_size import keras_json_size
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

FLOAT32_BYTES = 4
# Per trainable weight, the optimizer slots Keras keeps (Adam: m and v; RMSprop: the running mean
# square; SGD: the velocity, only with momentum).
OPTIMIZER_SLOTS = {"adam": 2, "rmsprop": 1}
MEMORY_NOTE = (
    "float32 estimate for one training step: weights, their gradients, optimizer slots, the input "
    "batch, and every layer's output kept for backpropagation plus its gradient. Not included: the "
    "framework's own overhead (CUDA context and cuDNN workspace, about 0.3-1 GiB per process) and "
    "allocator fragmentation."
)


class SizeLimits(Protocol):
    """The limits :func:`size_problems` checks (``core.settings.Settings`` has them)."""

    max_model_parameters: int
    max_training_memory_bytes: int
    max_model_depth: int
    max_layer_width: int


@dataclass(frozen=True)
class ModelSize:
    """A model's size as its builder would make it.

    Args:
        parameters: every weight (trainable and not).
        trainable: trainable weights.
        activations_per_sample: floats every layer outputs for one sample (the input layer excluded).
        io_per_sample: floats of one sample's input plus its target.
    """

    parameters: int
    trainable: int
    activations_per_sample: int
    io_per_sample: int


def optimizer_slots(spec: JobSpec) -> int:
    """Optimizer state kept per trainable weight."""
    optimizer = spec.training.optimizer
    return OPTIMIZER_SLOTS.get(optimizer.name, 1 if getattr(optimizer, "momentum", 0) > 0 else 0)


def training_memory(
    *,
    parameters: int,
    trainable: int,
    slots: int,
    batch_size: int,
    io_per_sample: int,
    activations_per_sample: int,
    itemsize: int = FLOAT32_BYTES,
) -> dict[str, Any]:
    """Bytes one training step needs, broken down; the one formula the size check and the dry run share.

    Returns:
        ``{"weights", "gradients", "optimizer_state", "input_batch", "activations_per_batch", "total",
        "batch_size", "note"}``, sizes in bytes.
    """
    estimate = {
        "weights": parameters * itemsize,
        "gradients": trainable * itemsize,
        "optimizer_state": slots * trainable * itemsize,
        "input_batch": batch_size * io_per_sample * itemsize,
        "activations_per_batch": 2 * batch_size * activations_per_sample * itemsize,
    }
    return {**estimate, "total": sum(estimate.values()), "batch_size": batch_size, "note": MEMORY_NOTE}


# --------------------------------------------------------------------------------------------------------
# Layer by layer, as models/blocks builds them
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Tally:
    """Running totals while walking a model's layers; ``shape`` is the current per-sample shape."""

    shape: tuple[int, ...]
    parameters: int = 0
    trainable: int = 0
    activations: int = 0

    def output(self, shape: tuple[int, ...] | None = None, times: int = 1) -> None:
        """A layer (``times`` alike) producing ``shape`` (default: the current shape)."""
        if shape is not None:
            self.shape = shape
        self.activations += times * math.prod(self.shape)

    def dense(self, units: int, *, bias: bool = True) -> None:
        weights = self.shape[-1] * units + (units if bias else 0)
        self.parameters += weights
        self.trainable += weights
        self.output((*self.shape[:-1], units))

    def batch_norm(self) -> None:
        channels = self.shape[-1]
        self.parameters += 4 * channels  # gamma, beta trainable; moving mean and variance not
        self.trainable += 2 * channels
        self.output()

    def conv(self, filters: int, kernel: int, stride: int, padding: str) -> None:
        height, width, channels = self.shape
        weights = kernel * kernel * channels * filters + filters
        self.parameters += weights
        self.trainable += weights
        if padding == "same":
            height, width = -(-height // stride), -(-width // stride)
        else:
            height, width = (height - kernel) // stride + 1, (width - kernel) // stride + 1
        self.output((max(height, 0), max(width, 0), filters))

    def flatten_if_needed(self) -> None:
        if len(self.shape) > 1:
            self.output((math.prod(self.shape),))

    def project_to_width(self, width: int) -> None:
        if self.shape[-1] != width:
            self.dense(width)
            self.output()  # its activation layer


def _preprocess(tally: _Tally, spec: JobSpec) -> None:
    arch = spec.architecture
    if arch.input_normalization != "none":  # Normalization (mean/variance as constants) or Rescaling
        tally.output()
    if isinstance(arch, CnnArchitecture | ResnetConvArchitecture) and len(tally.shape) == 2:
        tally.output((*tally.shape, 1))  # Reshape adding the channel axis


def _mlp(tally: _Tally, arch: MlpArchitecture | SnnArchitecture) -> None:
    tally.flatten_if_needed()
    batch_norm_bias = isinstance(arch, MlpArchitecture)  # mlp drops the Dense bias before a BN; snn keeps it
    for units in arch.widths:
        tally.dense(units, bias=not (arch.batch_norm and batch_norm_bias))
        if arch.batch_norm:
            tally.batch_norm()
        tally.output()  # activation
        if arch.dropout > 0:
            tally.output()
        if isinstance(arch, SnnArchitecture) and arch.alpha_dropout > 0:
            tally.output()


def _highway(tally: _Tally, arch: HighwayArchitecture) -> None:
    tally.flatten_if_needed()
    tally.project_to_width(arch.width)
    width = arch.width
    per_block_weights = 2 * (width * width + width)
    layers = 5 + (arch.activation == "leaky_relu") + (arch.dropout > 0)  # h, [act], t, h-x, gated, add, [drop]
    tally.parameters += arch.depth * per_block_weights
    tally.trainable += arch.depth * per_block_weights
    tally.output(times=arch.depth * layers)


def _resnet_dense(tally: _Tally, arch: ResnetDenseArchitecture) -> None:
    tally.flatten_if_needed()
    tally.project_to_width(arch.width)
    width = arch.width
    dense_weights = width * width + (0 if arch.batch_norm else width)
    bn = 4 * width if arch.batch_norm else 0
    bn_trainable = 2 * width if arch.batch_norm else 0
    layers = 2 + 2 * arch.batch_norm + 1 + (arch.dropout > 0) + 2  # 2 dense, [2 bn], act, [drop], add, out
    tally.parameters += arch.blocks * 2 * (dense_weights + bn)
    tally.trainable += arch.blocks * 2 * (dense_weights + bn_trainable)
    tally.output(times=arch.blocks * layers)


def _resnet_conv(tally: _Tally, arch: ResnetConvArchitecture) -> None:
    def conv_bn_act(filters: int, kernel: int, stride: int, activate: bool = True) -> None:
        tally.conv(filters, kernel, stride, "same")
        if arch.batch_norm:
            tally.batch_norm()
        if activate:
            tally.output()

    conv_bn_act(arch.stem_filters or arch.filters[0], arch.kernel_size, 1)
    for index, (blocks, filters) in enumerate(zip(arch.stages, arch.filters, strict=True), start=1):
        for block in range(blocks):
            stride = 2 if index > 1 and block == 0 else 1
            out_channels = 4 * filters if arch.block == "bottleneck" else filters
            block_input = tally.shape
            if stride != 1 or block_input[-1] != out_channels:
                conv_bn_act(out_channels, 1, stride, activate=False)  # projection shortcut
                tally.shape = block_input
            if arch.block == "bottleneck":
                conv_bn_act(filters, 1, stride)
                conv_bn_act(filters, arch.kernel_size, 1)
                conv_bn_act(out_channels, 1, 1, activate=False)
            else:
                conv_bn_act(filters, arch.kernel_size, stride)
                conv_bn_act(filters, arch.kernel_size, 1, activate=False)
            tally.output(times=2)  # add, out
    tally.output((tally.shape[-1],))  # global average pooling


def _cnn(tally: _Tally, arch: CnnArchitecture) -> None:
    for filters in arch.filters:
        tally.conv(filters, arch.kernel_size, 1, arch.padding)
        tally.output()  # activation
    height, width, channels = tally.shape
    pool = arch.pool_size
    tally.output((max((height - pool) // pool + 1, 0), max((width - pool) // pool + 1, 0), channels))
    if arch.dropout > 0:
        tally.output()
    tally.output((math.prod(tally.shape),))  # flatten
    tally.dense(arch.dense_units)
    tally.output()  # activation
    if arch.dense_dropout > 0:
        tally.output()


_BODIES: dict[type, Any] = {
    MlpArchitecture: _mlp,
    SnnArchitecture: _mlp,
    HighwayArchitecture: _highway,
    ResnetDenseArchitecture: _resnet_dense,
    ResnetConvArchitecture: _resnet_conv,
    CnnArchitecture: _cnn,
}


def model_size(spec: JobSpec, input_shape: list[int], output_units: int) -> ModelSize | None:
    """The size of the model ``build_model`` would build, every family (keras_json: ``models.keras_size``).

    Call :func:`size_problems` first (or know the depth is bounded): the walk is linear in the depth.

    Args:
        spec: the validated spec.
        input_shape: the data's per-sample input shape.
        output_units: units of the output layer.

    Returns:
        The size; None for a keras_json model that cannot be sized (submit refused it:
        ``models.fit.spec_data_problems``).
    """
    io = math.prod(input_shape) + output_units
    arch = spec.architecture
    if isinstance(arch, KerasJsonArchitecture):
        try:
            walked = keras_json_size(arch.config(), input_shape)
        except SpecError:
            return None
        return ModelSize(walked.parameters, walked.trainable, walked.activations_per_sample, io)
    body = _BODIES[type(arch)]
    tally = _Tally(tuple(input_shape))
    _preprocess(tally, spec)
    body(tally, spec.architecture)
    tally.dense(output_units)
    return ModelSize(tally.parameters, tally.trainable, tally.activations, io)


def estimated_training_bytes(spec: JobSpec, size: ModelSize) -> int:
    """Bytes one training step of ``spec``'s model (of ``size``) needs: :func:`training_memory`'s total."""
    total: int = training_memory(
        parameters=size.parameters,
        trainable=size.trainable,
        slots=optimizer_slots(spec),
        batch_size=spec.training.batch_size,
        io_per_sample=size.io_per_sample,
        activations_per_sample=size.activations_per_sample,
    )["total"]
    return total


# --------------------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------------------


def _depth_and_widths(spec: JobSpec) -> tuple[str, int, list[tuple[str, int]]]:
    """``(depth field, depth, [(width field, width), ...])`` of a built-in family."""
    arch = spec.architecture
    if isinstance(arch, MlpArchitecture | SnnArchitecture):
        return "widths", len(arch.widths), [(f"widths.{i}", w) for i, w in enumerate(arch.widths)]
    if isinstance(arch, HighwayArchitecture):
        return "depth", arch.depth, [("width", arch.width)]
    if isinstance(arch, ResnetDenseArchitecture):
        return "blocks", arch.blocks, [("width", arch.width)]
    if isinstance(arch, ResnetConvArchitecture):
        widths = [(f"filters.{i}", f) for i, f in enumerate(arch.filters)]  # a bottleneck's 4x shows in parameters
        if arch.stem_filters is not None:
            widths.append(("stem_filters", arch.stem_filters))
        return "stages", sum(arch.stages), widths
    assert isinstance(arch, CnnArchitecture)
    widths = [(f"filters.{i}", f) for i, f in enumerate(arch.filters)]
    return "filters", len(arch.filters), [*widths, ("dense_units", arch.dense_units)]


def _keras_json_layers(config: Any) -> Iterator[dict[str, Any]]:
    """The layer configs of a serialized Sequential/Functional model (nested models flattened)."""
    stack = [config]
    while stack:
        node = stack.pop()
        inner = node.get("config") if isinstance(node, dict) else None
        layers = inner.get("layers") if isinstance(inner, dict) else None
        if not isinstance(layers, list):
            continue
        for layer in layers:
            if isinstance(layer, dict):
                yield layer
                stack.append(layer)


def _keras_json_depth(arch: KerasJsonArchitecture) -> tuple[int, list[tuple[str, int]]]:
    """``(layers, [(field, units or filters)])`` of a keras_json model, for the depth and width limits."""
    layers = 0
    widths: list[tuple[str, int]] = []
    for layer in _keras_json_layers(arch.config()):
        layers += 1
        config: dict[str, Any] = layer["config"] if isinstance(layer.get("config"), dict) else {}
        name = config.get("name", "?")
        for key in ("units", "filters", "output_dim"):
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                widths.append((f"model_json layer {name!r} {key}", value))
    return layers, widths


def size_problems(spec: JobSpec, input_shape: list[int], output_units: int, limits: SizeLimits) -> list[Problem]:
    """Every way the spec's model breaks the lab's size limits (empty when it fits).

    Args:
        spec: the validated spec.
        input_shape: the data's per-sample input shape.
        output_units: units of the output layer.
        limits: ``max_model_parameters``, ``max_training_memory_bytes``, ``max_model_depth``,
            ``max_layer_width``.

    Returns:
        Problems (code ``model_too_large``) naming the field, the value and the limit with its setting.
    """
    arch = spec.architecture
    problems: list[Problem] = []
    if isinstance(arch, KerasJsonArchitecture):
        depth_field, (depth, widths) = "model_json", _keras_json_depth(arch)
    else:
        depth_field, depth, widths = _depth_and_widths(spec)
    if depth > limits.max_model_depth:
        problems.append(
            _too_large(
                depth_field,
                f"{depth} layers/blocks is more than the limit of {limits.max_model_depth} (GPUYARD_MAX_MODEL_DEPTH)",
                f"depth {depth}",
            )
        )
    for field, width in widths:
        if width > limits.max_layer_width:
            problems.append(
                _too_large(
                    field.split(" ")[0],
                    f"{width} units/filters in one layer is more than the limit of {limits.max_layer_width} "
                    "(GPUYARD_MAX_LAYER_WIDTH)",
                    f"{field.replace('model_json ', '')}={width}",
                )
            )
            break  # one is enough; widths=[2**62]*100000 should not give 100000 problems
    if problems:
        return problems
    size = model_size(spec, input_shape, output_units)
    if size is None:  # a keras_json model that cannot be sized: spec_data_problems says why
        return problems
    parameters = size.parameters
    field = depth_field
    if parameters > limits.max_model_parameters:
        problems.append(
            _too_large(
                field,
                f"the model would have {parameters:,} parameters, more than the limit of "
                f"{limits.max_model_parameters:,} (GPUYARD_MAX_MODEL_PARAMETERS)",
                _received(spec),
            )
        )
    memory = estimated_training_bytes(spec, size)
    if memory > limits.max_training_memory_bytes:
        problems.append(
            _too_large(
                "training.batch_size" if parameters <= limits.max_model_parameters else field,
                f"one training step would need about {memory:,} bytes ({memory / 2**30:.1f} GiB), more "
                f"than the limit of {limits.max_training_memory_bytes:,} bytes "
                "(GPUYARD_MAX_TRAINING_MEMORY_BYTES); use a smaller batch_size or model",
                f"{_received(spec)}, batch_size={spec.training.batch_size}",
            )
        )
    return problems


def _received(spec: JobSpec) -> str:
    arch = spec.architecture
    if isinstance(arch, KerasJsonArchitecture):
        return "model_json=(the model)"
    fields = ("depth", "width", "blocks", "widths", "stages", "filters", "dense_units")
    parts = []
    for name in fields:
        value = getattr(arch, name, None)
        if value is None:
            continue
        text = repr(value)
        parts.append(f"{name}={text if len(text) <= 60 else text[:57] + '...'}")
    return ", ".join(parts)


def _too_large(field: str, message: str, received: str) -> Problem:
    path = "architecture." + field if not field.startswith("training.") else field
    return Problem("model_too_large", f"{path}: {message}. Received: {received}", path)

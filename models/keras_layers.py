"""What one built-in Keras layer holds and outputs, from its config alone: the rules of the keras_json size.

No Keras import (the API sizes a submitted model before anything is built). Each rule takes the layer's
``config`` and the per-sample shapes of its inputs (batch axis left out) and returns a :class:`Counted`:
its output shape, its weights (as Keras counts them, ``tests/models/test_keras_size.py`` checks every
rule against the built layer) and the floats it keeps for backpropagation besides its output (attention
scores, a recurrent layer's gates per step). A layer class without a rule, or an option a rule cannot
size, raises :class:`Uncountable` with the reason: such a model is refused at submit, never guessed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Shape = tuple[int, ...]


class Uncountable(Exception):
    """A layer (or one of its options) this module cannot size; the message says why."""


@dataclass(frozen=True)
class Counted:
    """One call of a layer: its output shape, weights (counted once per layer) and hidden activations."""

    output: Shape
    parameters: int = 0
    trainable: int = 0
    hidden: int = 0


Rule = Callable[[dict[str, Any], list[Shape]], Counted]


# ── helpers ──────────────────────────────────────────────────────────────────────────────────────────────
def _one(inputs: list[Shape]) -> Shape:
    if len(inputs) != 1:
        raise Uncountable(f"expected one input, received {len(inputs)}")
    return inputs[0]


def _int(config: dict[str, Any], key: str, default: Any = None, *, low: int = 1) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise Uncountable(f"{key} must be an integer of at least {low}, received {value!r}")
    return value


def _ints(value: Any, rank: int, key: str, *, low: int = 1) -> tuple[int, ...]:
    """An int or a list of ``rank`` ints (Keras's ``standardize_tuple``)."""
    values = [value] * rank if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(values, list | tuple)
        or len(values) != rank
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values)
    ):
        raise Uncountable(f"{key} must be an integer or {rank} integers of at least {low}, received {value!r}")
    return tuple(values)


def _axis(axis: Any, rank: int) -> int:
    """A Keras axis (counted with the batch axis, may be negative) as an index into the per-sample shape."""
    if isinstance(axis, bool) or not isinstance(axis, int) or not -(rank + 1) <= axis <= rank or axis == 0:
        raise Uncountable(f"axis {axis!r} is not a feature axis of an input of rank {rank + 1}")
    return (axis if axis > 0 else axis + rank + 1) - 1


def _axes(axis: Any, rank: int) -> list[int]:
    return [_axis(a, rank) for a in (axis if isinstance(axis, list | tuple) else [axis])]


def _weights(config: dict[str, Any], parameters: int, trainable: int | None = None) -> tuple[int, int]:
    """``(parameters, trainable)``; a layer with ``trainable: false`` trains none of them."""
    return parameters, (0 if config.get("trainable") is False else parameters if trainable is None else trainable)


def _plain(config: dict[str, Any]) -> None:
    """Refuse the options that add weights no rule counts (LoRA adapters, quantized kernels)."""
    if config.get("lora_rank"):
        raise Uncountable("LoRA (lora_rank) is not sized")
    if config.get("quantization_config") is not None or config.get("dtype") in ("int8", "int4", "float8"):
        raise Uncountable("quantized layers are not sized")


def _same(config: dict[str, Any], inputs: list[Shape]) -> Counted:
    return Counted(_one(inputs))


def _spatial(config: dict[str, Any], shape: Shape, rank: int) -> tuple[Shape, int, bool]:
    """``(spatial dims, channels, channels_first)`` of an image-like input of ``rank`` spatial axes."""
    if len(shape) != rank + 1:
        raise Uncountable(f"expected an input of rank {rank + 2} (batch, {rank} spatial axes, channels)")
    first = config.get("data_format") == "channels_first"
    return (shape[1:], shape[0], True) if first else (shape[:-1], shape[-1], False)


def _joined(spatial: Shape, channels: int, first: bool) -> Shape:
    return (channels, *spatial) if first else (*spatial, channels)


def _window(size: int, kernel: int, stride: int, padding: str, dilation: int = 1) -> int:
    if padding in ("same", "causal"):
        return -(-size // stride)
    if padding != "valid":
        raise Uncountable(f"padding {padding!r} is not sized")
    return max((size - dilation * (kernel - 1) - 1) // stride + 1, 0)


# ── core, activations, regularization, reshaping ────────────────────────────────────────────────────────
def _dense(config: dict[str, Any], inputs: list[Shape]) -> Counted:
    _plain(config)
    shape, units = _one(inputs), _int(config, "units")
    parameters = shape[-1] * units + (units if config.get("use_bias", True) else 0)
    return Counted((*shape[:-1], units), *_weights(config, parameters))


def _embedding(config: dict[str, Any], inputs: list[Shape]) -> Counted:
    _plain(config)
    parameters = _int(config, "input_dim") * _int(config, "output_dim")
    return Counted((*_one(inputs), config["output_dim"]), *_weights(config, parameters))


def _prelu(config: dict[str, Any], inputs: list[Shape]) -> Counted:
    shape = _one(inputs)
    shared = config.get("shared_axes") or []
    shared = [shared] if isinstance(shared, int) else shared
    kept = set(range(len(shape))) - {_axis(a, len(shape)) for a in shared}
    return Counted(shape, *_weights(config, math.prod(shape[i] for i in kept)))


def _flatten(config: dict[str, Any], inputs: list[Shape]) -> Counted:
    return Counted((math.prod(_one(inputs)),))


def _reshape(config: dict[str, Any], inputs: list[Shape]) -> Counted:
    size, target = math.prod(_one(inputs)), config.get("target_shape")
    if not isinstance(target, list | tuple) or not all(isinstance(d, int) and (d > 0 or d == -1) for d in target):
        raise Uncountable(f"target_shape must be a list of positive integers (one may be -1), received {target!r}")
    known = math.prod(d for d in target if d != -1)
    if list(target).count(-1) > 1 or (-1 in target and size % known) or (-1 not in target and known != size):
        raise Uncountable(f"cannot reshape {size} values into {list(target)}")
    return Counted(tuple(size // known if d == -1 else d for d in target))


def _permute(config: dict[str, Any], inputs: list[Shape]) -> Counted:
    shape, dims = _one(inputs), config.get("dims")
    if not isinstance(dims, list | tuple) or sorted(dims) != list(range(1, len(shape) + 1)):
        raise Uncountable(f"dims must permute 1..{len(shape)}, received {dims!r}")
    return Counted(tuple(shape[d - 1] for d in dims))


def _repeat_vector(config: dict[str, Any], inputs: list[Shape]) -> Counted:
    shape = _one(inputs)
    if len(shape) != 1:
        raise Uncountable(f"expected an input of rank 2, received rank {len(shape) + 1}")
    return Counted((_int(config, "n"), shape[0]))


# ── normalization ────────────────────────────────────────────────────────────────────────────────────────
def _batch_norm(config: dict[str, Any], inputs: list[Shape]) -> Counted:
    shape = _one(inputs)
    channels = math.prod(shape[a] for a in _axes(config.get("axis", -1), len(shape)))
    learned = channels * (bool(config.get("center", True)) + bool(config.get("scale", True)))
    return Counted(shape, *_weights(config, learned + 2 * channels, learned))  # + moving mean and variance


def _layer_norm(config: dict[str, Any], inputs: list[Shape]) -> Counted:
    shape = _one(inputs)
    features = math.prod(shape[a] for a in _axes(config.get("axis", -1), len(shape)))
    rms = bool(config.get("rms_scaling", False))
    gamma = bool(config.get("scale", True)) or rms
    beta = bool(config.get("center", True)) and not rms
    return Counted(shape, *_weights(config, features * (gamma + beta)))


def _group_norm(config: dict[str, Any], inputs: list[Shape]) -> Counted:
    shape = _one(inputs)
    channels = shape[_axis(config.get("axis", -1), len(shape))]
    groups = _int(config, "groups", 32)
    if groups > channels or channels % groups:
        raise Uncountable(f"{channels} channels do not split into groups={groups}")
    learned = channels * (bool(config.get("center", True)) + bool(config.get("scale", True)))
    return Counted(shape, *_weights(config, learned))


def _rms_norm(config: dict[str, Any], inputs: list[Shape]) -> Counted:
    shape = _one(inputs)
    return Counted(shape, *_weights(config, math.prod(shape[a] for a in _axes(config.get("axis", -1), len(shape)))))


def _normalization(config: dict[str, Any], inputs: list[Shape]) -> Counted:
    shape = _one(inputs)
    if config.get("mean") is not None or config.get("variance") is not None:
        return Counted(shape)  # given as constants: no weights
    kept = math.prod(shape[a] for a in _axes(config.get("axis", -1), len(shape)))
    return Counted(shape, 2 * kept + 1, 0)  # mean, variance, count: never trained


# ── convolutions and pooling ─────────────────────────────────────────────────────────────────────────────
def _conv(rank: int, kind: str) -> Rule:
    def rule(config: dict[str, Any], inputs: list[Shape]) -> Counted:
        _plain(config)
        spatial, channels, first = _spatial(config, _one(inputs), rank)
        kernel = _ints(config.get("kernel_size"), rank, "kernel_size")
        strides = _ints(config.get("strides", 1), rank, "strides")
        dilation = _ints(config.get("dilation_rate", 1), rank, "dilation_rate")
        padding = config.get("padding", "valid")
        if kind == "transpose":
            if config.get("output_padding") is not None:
                raise Uncountable("output_padding is not sized")
            out = tuple(
                n * s + max(d * (k - 1) + 1 - s, 0) if padding == "valid" else n * s
                for n, k, s, d in zip(spatial, kernel, strides, dilation, strict=True)
            )
        else:
            out = tuple(
                _window(n, k, s, padding, d) for n, k, s, d in zip(spatial, kernel, strides, dilation, strict=True)
            )
        window, bias = math.prod(kernel), config.get("use_bias", True)
        if kind == "depthwise":
            filters = channels * _int(config, "depth_multiplier", 1)
            parameters = window * filters
        elif kind == "separable":
            middle, filters = channels * _int(config, "depth_multiplier", 1), _int(config, "filters")
            parameters = window * middle + middle * filters
        else:
            filters, groups = _int(config, "filters"), _int(config, "groups", 1)
            if channels % groups or filters % groups:
                raise Uncountable(f"{channels} input channels and {filters} filters do not split into groups={groups}")
            parameters = window * (channels // groups) * filters
        parameters += filters if bias else 0
        return Counted(_joined(out, filters, first), *_weights(config, parameters))

    return rule


def _pool(rank: int) -> Rule:
    def rule(config: dict[str, Any], inputs: list[Shape]) -> Counted:
        spatial, channels, first = _spatial(config, _one(inputs), rank)
        pool = _ints(config.get("pool_size", 2), rank, "pool_size")
        strides = _ints(config.get("strides") or pool, rank, "strides")
        padding = config.get("padding", "valid")
        out = tuple(_window(n, p, s, padding) for n, p, s in zip(spatial, pool, strides, strict=True))
        return Counted(_joined(out, channels, first))

    return rule


def _global_pool(rank: int) -> Rule:
    def rule(config: dict[str, Any], inputs: list[Shape]) -> Counted:
        _spatial_dims, channels, first = _spatial(config, _one(inputs), rank)
        if config.get("keepdims"):
            return Counted(_joined((1,) * rank, channels, first))
        return Counted((channels,))

    return rule


def _resample(rank: int, kind: str) -> Rule:
    def rule(config: dict[str, Any], inputs: list[Shape]) -> Counted:
        spatial, channels, first = _spatial(config, _one(inputs), rank)
        if kind == "upsample":
            size = _ints(config.get("size", 2), rank, "size")
            return Counted(_joined(tuple(n * f for n, f in zip(spatial, size, strict=True)), channels, first))
        key = "padding" if kind == "pad" else "cropping"
        value = config.get(key, 1 if kind == "pad" else 0)
        if isinstance(value, int) and not isinstance(value, bool):
            pairs = [(value, value)] * rank
        elif isinstance(value, list | tuple) and len(value) == rank:
            pairs = [_pair(_ints(v, 2, key, low=0)) for v in value]
        elif rank == 1:
            pairs = [_pair(_ints(value, 2, key, low=0))]
        else:
            raise Uncountable(f"{key} {value!r} is not sized")
        sign = 1 if kind == "pad" else -1
        out = tuple(n + sign * (a + b) for n, (a, b) in zip(spatial, pairs, strict=True))
        if min(out) < 1:
            raise Uncountable(f"cropping {value!r} leaves nothing of {list(spatial)}")
        return Counted(_joined(out, channels, first))

    return rule


# ── merging ──────────────────────────────────────────────────────────────────────────────────────────────
def _elementwise(config: dict[str, Any], inputs: list[Shape]) -> Counted:
    if len(inputs) < 2 or len({len(s) for s in inputs}) != 1:
        raise Uncountable("expected at least two inputs of the same rank")
    out = []
    for dims in zip(*inputs, strict=True):
        wide = set(dims) - {1}
        if len(wide) > 1:
            raise Uncountable(f"inputs of shapes {[list(s) for s in inputs]} do not broadcast")
        out.append(max(dims))
    return Counted(tuple(out))


def _concatenate(config: dict[str, Any], inputs: list[Shape]) -> Counted:
    if len(inputs) < 2 or len({len(s) for s in inputs}) != 1:
        raise Uncountable("expected at least two inputs of the same rank")
    axis = _axis(config.get("axis", -1), len(inputs[0]))
    others = {s[:axis] + s[axis + 1 :] for s in inputs}
    if len(others) != 1:
        raise Uncountable(f"inputs of shapes {[list(s) for s in inputs]} differ off the concatenation axis")
    first = inputs[0]
    return Counted((*first[:axis], sum(s[axis] for s in inputs), *first[axis + 1 :]))


# ── sequences and attention ──────────────────────────────────────────────────────────────────────────────
_RNN_GATES = {"SimpleRNN": 1, "GRU": 3, "LSTM": 4}


def _recurrent(class_name: str) -> Rule:
    gates = _RNN_GATES[class_name]

    def rule(config: dict[str, Any], inputs: list[Shape]) -> Counted:
        shape = _one(inputs)
        if len(shape) != 2:
            raise Uncountable(f"expected an input of rank 3 (batch, steps, features), received rank {len(shape) + 1}")
        if config.get("return_state"):
            raise Uncountable("return_state (several outputs) is not sized")
        steps, features, units = shape[0], shape[1], _int(config, "units")
        bias = gates * units if config.get("use_bias", True) else 0
        if class_name == "GRU" and config.get("reset_after", True) and bias:
            bias *= 2
        parameters = gates * units * (features + units) + bias
        out = (steps, units) if config.get("return_sequences") else (units,)
        return Counted(out, *_weights(config, parameters), hidden=steps * gates * units)

    return rule


def _multi_head_attention(config: dict[str, Any], inputs: list[Shape]) -> Counted:
    if len(inputs) not in (2, 3) or any(len(s) != 2 for s in inputs):
        raise Uncountable("expected query and value (and key) inputs of rank 3 (batch, steps, features)")
    if config.get("attention_axes") not in (None, [1], (1,), 1, -2, [-2]):
        raise Uncountable("attention over axes other than the steps is not sized")
    if config.get("use_gate") or config.get("output_shape") is not None:
        raise Uncountable("use_gate and output_shape are not sized")
    query, value = inputs[0], inputs[1]
    key = inputs[2] if len(inputs) == 3 else value
    heads, key_dim = _int(config, "num_heads"), _int(config, "key_dim")
    value_dim = _int(config, "value_dim", key_dim)
    bias = bool(config.get("use_bias", True))
    parameters = (
        (query[1] + bias) * heads * key_dim
        + (key[1] + bias) * heads * key_dim
        + (value[1] + bias) * heads * value_dim
        + heads * value_dim * query[1]
        + (query[1] if bias else 0)
    )
    projections = query[0] * heads * key_dim + key[0] * heads * key_dim + value[0] * heads * value_dim
    scores = 2 * heads * query[0] * key[0]  # the scores and their softmax
    hidden = projections + scores + query[0] * heads * value_dim
    return Counted(query, *_weights(config, parameters), hidden=hidden)


_SAME_SHAPE = (
    "Activation ActivityRegularization AlphaDropout Dropout ELU GaussianDropout GaussianNoise Identity LeakyReLU "
    "Masking ReLU Rescaling Softmax SpatialDropout1D SpatialDropout2D SpatialDropout3D UnitNormalization"
)
RULES: dict[str, Rule] = {name: _same for name in _SAME_SHAPE.split()}
RULES.update(
    {
        "Dense": _dense,
        "Embedding": _embedding,
        "PReLU": _prelu,
        "Flatten": _flatten,
        "Reshape": _reshape,
        "Permute": _permute,
        "RepeatVector": _repeat_vector,
        "BatchNormalization": _batch_norm,
        "LayerNormalization": _layer_norm,
        "GroupNormalization": _group_norm,
        "RMSNormalization": _rms_norm,
        "Normalization": _normalization,
        "Add": _elementwise,
        "Subtract": _elementwise,
        "Multiply": _elementwise,
        "Average": _elementwise,
        "Maximum": _elementwise,
        "Minimum": _elementwise,
        "Concatenate": _concatenate,
        "MultiHeadAttention": _multi_head_attention,
    }
)
for _rank in (1, 2, 3):
    for _alias in ("Conv", "Convolution"):
        RULES[f"{_alias}{_rank}D"] = _conv(_rank, "conv")
        RULES[f"{_alias}{_rank}DTranspose"] = _conv(_rank, "transpose")
    for _pool_name in ("MaxPooling", "MaxPool", "AveragePooling", "AvgPool"):
        RULES[f"{_pool_name}{_rank}D"] = _pool(_rank)
    for _pool_name in ("GlobalMaxPooling", "GlobalMaxPool", "GlobalAveragePooling", "GlobalAvgPool"):
        RULES[f"{_pool_name}{_rank}D"] = _global_pool(_rank)
    RULES[f"UpSampling{_rank}D"] = _resample(_rank, "upsample")
    RULES[f"ZeroPadding{_rank}D"] = _resample(_rank, "pad")
    RULES[f"Cropping{_rank}D"] = _resample(_rank, "crop")
for _rank in (1, 2):
    RULES[f"DepthwiseConv{_rank}D"] = _conv(_rank, "depthwise")
    for _alias in ("SeparableConv", "SeparableConvolution"):
        RULES[f"{_alias}{_rank}D"] = _conv(_rank, "separable")
for _name in _RNN_GATES:
    RULES[_name] = _recurrent(_name)


def _pair(values: tuple[int, ...]) -> tuple[int, int]:
    """Two ints (``_ints`` checked the count) as the pair a padding or cropping side is."""
    first, second = values
    return first, second

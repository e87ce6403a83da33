"""The keras_json size (models/keras_size.py) against Keras itself: weights, output shape, activations.

Every layer rule is checked on a model Keras builds: the estimator's parameters and trainable weights
equal Keras's, its output shape equals the model's, and its activations equal the sum of the layers'
output sizes where no layer keeps hidden activations (attention scores, recurrent gates).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import keras
import pytest

from core.errors import SpecError
from models.keras_size import keras_json_size

L = keras.layers


def _seq(shape: tuple[int, ...], *layers: Any) -> keras.Model:
    return keras.Sequential([keras.Input(shape), *layers])


def _functional_merge() -> keras.Model:
    inputs = keras.Input((12,))
    a = L.Dense(8, name="a")(inputs)
    b = L.Dense(8, use_bias=False, name="b")(inputs)
    shared = L.Dense(8, name="shared")
    c = shared(L.Add()([a, b]))
    d = shared(c)  # a shared layer: weights once, outputs twice
    merged = L.Concatenate()([L.Multiply()([c, d]), L.Subtract()([c, a])])
    return keras.Model(inputs, L.Dense(3)(L.LayerNormalization()(merged)))


def _nested() -> keras.Model:
    inner = _seq((16,), L.Dense(9), L.BatchNormalization(), L.Dense(7))
    inputs = keras.Input((16,))
    return keras.Model(inputs, L.Dense(2)(inner(inputs)))


def _attention() -> keras.Model:
    inputs = keras.Input((10, 6))
    attended = L.MultiHeadAttention(num_heads=3, key_dim=4, value_dim=5)(inputs, inputs)
    return keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling1D()(attended)))


MODELS: dict[str, Callable[[], keras.Model]] = {
    "dense-norms": lambda: _seq(
        (20,),
        L.Dense(30),
        L.LayerNormalization(),
        L.Dense(20, use_bias=False),
        L.BatchNormalization(center=False),
        L.Activation("relu"),
        L.Dropout(0.1),
        L.UnitNormalization(),
        L.RMSNormalization(),
        L.PReLU(),
        L.Dense(4, trainable=False),
    ),
    "normalization-adapt": lambda: _seq((5,), L.Normalization(), L.Dense(2)),
    "normalization-constant": lambda: _seq((5,), L.Normalization(mean=[0.0] * 5, variance=[1.0] * 5), L.Dense(2)),
    "embedding-rnn": lambda: _seq(
        (7,),
        L.Embedding(50, 6),
        L.LSTM(5, return_sequences=True),
        L.GRU(4, return_sequences=True),
        L.GRU(4, reset_after=False, return_sequences=True),
        L.SimpleRNN(3),
        L.Dense(2),
    ),
    "bidirectional-timedistributed": lambda: _seq(
        (6, 4),
        L.Bidirectional(L.LSTM(3, return_sequences=True)),
        L.TimeDistributed(L.Dense(5)),
        L.Bidirectional(L.GRU(2), merge_mode="sum"),
        L.Dense(2),
    ),
    "repeat-reshape-permute": lambda: _seq(
        (6,), L.RepeatVector(4), L.Permute((2, 1)), L.Reshape((3, -1)), L.Flatten(), L.Dense(2)
    ),
    "conv2d": lambda: _seq(
        (15, 13, 2),
        L.Conv2D(4, 3, strides=2, padding="same"),
        L.Conv2D(6, (3, 2), dilation_rate=(2, 1)),
        L.ZeroPadding2D(((1, 2), (0, 1))),
        L.MaxPooling2D(),
        L.SeparableConv2D(5, 3, depth_multiplier=2, padding="same"),
        L.DepthwiseConv2D(2, depth_multiplier=3),
        L.Conv2DTranspose(3, 3, strides=2),
        L.Conv2DTranspose(2, 2, strides=2, padding="same"),
        L.Cropping2D(((1, 0), (2, 1))),
        L.UpSampling2D((2, 1)),
        L.AveragePooling2D(3, strides=2, padding="same"),
        L.GroupNormalization(groups=2),
        L.Conv2D(4, 1, groups=2),
        L.GlobalMaxPooling2D(keepdims=True),
        L.Flatten(),
        L.Dense(2),
    ),
    "conv1d-3d": lambda: _seq(
        (20, 3),
        L.Conv1D(4, 3, padding="causal"),
        L.SeparableConv1D(4, 3),
        L.DepthwiseConv1D(3),
        L.MaxPool1D(2, padding="same"),
        L.UpSampling1D(3),
        L.Cropping1D((1, 2)),
        L.ZeroPadding1D(2),
        L.Conv1DTranspose(2, 3, strides=2),
        L.Reshape((17, 3, 2, 1)),
        L.Conv3D(3, 2),
        L.MaxPooling3D((2, 1, 1)),
        L.GlobalAveragePooling3D(),
        L.Dense(2),
    ),
    "channels-first": lambda: _seq(
        (2, 9, 9),
        L.Conv2D(3, 3, data_format="channels_first"),
        L.MaxPooling2D(data_format="channels_first"),
        L.GlobalAveragePooling2D(data_format="channels_first"),
        L.Dense(2),
    ),
    "functional-merge": _functional_merge,
    "nested": _nested,
    "attention": _attention,
}


def _keras_counts(model: keras.Model) -> tuple[int, int]:
    def count(weights: list[Any]) -> int:
        return int(sum(math.prod(w.shape) for w in weights))

    return count(model.weights), count(model.trainable_weights)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_estimate_counts_what_keras_builds(name: str) -> None:
    model = MODELS[name]()
    config = json.loads(model.to_json())
    input_shape = list(model.inputs[0].shape[1:])
    size = keras_json_size(config, input_shape)
    assert (size.parameters, size.trainable) == _keras_counts(model)
    assert list(size.output_shape) == list(model.outputs[0].shape[1:])
    assert size.declared_input == input_shape
    if name in ("dense-norms", "repeat-reshape-permute", "conv2d", "conv1d-3d", "channels-first"):
        outputs = sum(math.prod(layer.output.shape[1:]) for layer in model.layers)
        assert size.activations_per_sample == outputs


def test_the_issue_models_are_sized_in_full() -> None:
    """Each escaped the old count: a LayerNormalization between Dense layers, Embedding, RepeatVector."""
    chain = _seq((64,), L.Dense(20000), L.LayerNormalization(), L.Dense(20000), L.Dense(10))
    size = keras_json_size(json.loads(chain.to_json()), [64])
    assert size.parameters == chain.count_params() > 400_000_000
    embedding = json.loads(_seq((64,), L.Dense(10)).to_json())
    big = {"name": "e", "input_dim": 10**7, "output_dim": 100}
    embedding["config"]["layers"].insert(1, {"module": "keras.layers", "class_name": "Embedding", "config": big})
    assert keras_json_size(embedding, [64]).parameters >= 10**9
    repeat = {"module": "keras", "class_name": "Sequential", "config": {"name": "s", "layers": [
        {"module": "keras.layers", "class_name": "InputLayer", "config": {"batch_shape": [None, 64], "name": "i"}},
        {"module": "keras.layers", "class_name": "RepeatVector", "config": {"name": "r", "n": 10_000_000}},
    ]}}  # fmt: skip
    assert keras_json_size(repeat, [64]).activations_per_sample == 64 * 10_000_000


@pytest.mark.parametrize(
    ("layer", "reason"),
    [
        (L.Attention(), "no size rule"),
        (L.EinsumDense("abc,cd->abd", output_shape=(5, 4)), "no size rule"),
        (L.LSTM(3, return_state=True), "return_state"),
    ],
    ids=["attention", "einsum", "return-state"],
)
def test_a_layer_it_cannot_size_is_refused_by_name(layer: Any, reason: str) -> None:
    config = json.loads(_seq((5, 4), L.Dense(4)).to_json())
    config["config"]["layers"][1] = json.loads(json.dumps(keras.saving.serialize_keras_object(layer)))
    config["config"]["layers"][1]["config"]["name"] = "odd_one"
    with pytest.raises(SpecError) as caught:
        keras_json_size(config, [5, 4])
    problem = caught.value.problems[0]
    assert problem.code == "keras_json_refused"
    assert "'odd_one'" in problem.detail and reason in problem.detail


def test_two_inputs_are_refused() -> None:
    first, second = keras.Input((4,)), keras.Input((4,))
    model = keras.Model([first, second], L.Dense(2)(L.Add()([first, second])))
    with pytest.raises(SpecError) as caught:
        keras_json_size(json.loads(model.to_json()), [4])
    assert caught.value.problems[0].code == "keras_json_invalid"
    assert "one input and one output" in caught.value.problems[0].detail


@pytest.mark.parametrize(
    "change",
    [
        {"config": {"name": "d", "units": [3]}},
        {"config": {"name": "d", "units": 3}, "inbound_nodes": 7},
        {"class_name": "Reshape", "config": {"name": "d", "target_shape": []}},
    ],
    ids=["units-list", "nodes-int", "reshape-empty"],
)
def test_malformed_values_are_a_clear_refusal_not_a_crash(change: dict[str, Any]) -> None:
    inputs = keras.Input((4,))
    config = json.loads(keras.Model(inputs, L.Dense(2, name="d")(L.Dense(3)(inputs))).to_json())
    layer = config["config"]["layers"][1]
    layer.update({k: v for k, v in change.items() if k != "config"})
    layer["config"].update(change.get("config", {}))
    with pytest.raises(SpecError) as caught:
        keras_json_size(config, [4])
    assert caught.value.problems[0].code in ("keras_json_invalid", "keras_json_refused")

"""Per-layer training diagnostics on a fixed probe batch: gradient norms and block activation statistics.

The same function computes gradients on every Keras backend (``tf.GradientTape``, ``jax.grad`` over
``model.stateless_call``, torch autograd). The model runs with ``training=False`` so that the probe is
deterministic (no dropout noise, BatchNorm on its moving statistics) and consumes no random state, which
keeps a resumed run identical to an uninterrupted one.

Dead ReLU units come from the same forward pass: the probe's extractor model also returns the output of every
ReLU layer (a ``ReLU`` layer with no slope, an ``Activation("relu")``, or a Dense/Conv layer built with
``activation="relu"``); a unit (a Dense unit, or a conv channel at any position) that is never above 0 on any
probe row is dead. Each block then carries ``relu_units`` and ``dead_share`` (dead / relu_units), and
``parameters`` (its trainable weights, which tells the health rules which blocks have a gradient at all).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np


def weighted_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Leaf layers holding trainable weights, in the model's order, nested models flattened."""
    found: list[keras.layers.Layer] = []

    def visit(layer: keras.layers.Layer) -> None:
        children = getattr(layer, "layers", None)
        if children:
            for child in children:
                visit(child)
        elif layer.trainable_weights:
            found.append(layer)

    for layer in model.layers:
        visit(layer)
    return found


def is_relu(layer: keras.layers.Layer) -> bool:
    """Whether ``layer`` outputs ``max(x, 0)``: ReLU units can die (never active again)."""
    if isinstance(layer, keras.layers.ReLU):
        return not layer.negative_slope and not layer.threshold
    return getattr(layer, "activation", None) is keras.activations.relu


def _parameters(layer: keras.layers.Layer) -> int:
    return int(sum(math.prod(w.shape) for w in layer.trainable_weights))


def _loss_value(model: keras.Model, y: Any, y_pred: Any) -> Any:
    """The compiled data loss (regularisers left out, the same on every backend), as a scalar."""
    loss = model.loss
    if isinstance(loss, list | tuple | dict):
        raise ValueError(f"Expected a single-output model with one loss. Received: loss={loss!r}")
    function = keras.losses.get(loss) if isinstance(loss, str) else loss
    if function is None:
        raise ValueError("Expected a compiled model. Received: a model without a loss")
    return keras.ops.mean(function(y, y_pred))


GradientFunction = Callable[[np.ndarray, np.ndarray], tuple[Any, Sequence[Any]]]


def gradient_function(model: keras.Model) -> GradientFunction:
    """``(x, y) -> (loss, gradients)`` for ``model.trainable_variables`` (same order), on the active backend.

    On JAX the function is jitted once and reads the variables' current values at each call.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf  # the active backend's framework only

        def tensorflow_gradients(x: np.ndarray, y: np.ndarray) -> tuple[Any, Sequence[Any]]:
            with tf.GradientTape() as tape:
                y_pred = model(x, training=False)
                loss = _loss_value(model, y, y_pred)
            return loss, tape.gradient(loss, model.trainable_variables)

        return tensorflow_gradients
    if backend == "jax":
        import jax  # the active backend's framework only

        def loss_of(trainable: list[Any], non_trainable: list[Any], x: Any, y: Any) -> Any:
            y_pred, _ = model.stateless_call(trainable, non_trainable, x, training=False)
            return _loss_value(model, y, y_pred)

        value_and_grad = jax.jit(jax.value_and_grad(loss_of))

        def jax_gradients(x: np.ndarray, y: np.ndarray) -> tuple[Any, Sequence[Any]]:
            trainable = [v.value for v in model.trainable_variables]
            non_trainable = [v.value for v in model.non_trainable_variables]
            return value_and_grad(trainable, non_trainable, x, y)

        return jax_gradients
    if backend == "torch":
        import torch  # the active backend's framework only

        def torch_gradients(x: np.ndarray, y: np.ndarray) -> tuple[Any, Sequence[Any]]:
            with torch.enable_grad():
                y_pred = model(keras.ops.convert_to_tensor(x), training=False)
                loss = _loss_value(model, keras.ops.convert_to_tensor(y), y_pred)
                variables = [v.value for v in model.trainable_variables]
                return loss.detach(), torch.autograd.grad(loss, variables, allow_unused=True)

        return torch_gradients
    raise ValueError(f"Expected backend tensorflow, jax or torch. Received: {backend!r}")


def _sum_squares(grad: Any) -> float:
    if grad is None:  # a weight the loss does not depend on
        return 0.0
    array = np.asarray(keras.ops.convert_to_numpy(grad), dtype=np.float64)
    return float(np.sum(np.square(array)))


def _layer_squares(model: keras.Model, grads: Sequence[Any]) -> dict[str, float]:
    by_variable = {id(v): _sum_squares(g) for v, g in zip(model.trainable_variables, grads, strict=True)}
    squares: dict[str, float] = {}
    for layer in weighted_layers(model):
        squares[layer.name] = sum(by_variable.get(id(v), 0.0) for v in layer.trainable_weights)
    return squares


def gradient_norms(model: keras.Model, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """L2 norm of the loss gradient per layer with trainable weights, on a batch ``(x, y)``.

    Works on the TensorFlow, JAX and torch backends; the model runs with ``training=False``.

    Returns:
        Layer name → L2 norm over all of that layer's trainable weights.
    """
    _, grads = gradient_function(model)(x, y)
    return {name: math.sqrt(value) for name, value in _layer_squares(model, grads).items()}


class Diagnostics:
    """Computes one diagnostics record per epoch on a fixed probe batch.

    Args:
        model: the compiled model being trained.
        blocks: block name → layer names (``models.build.layer_blocks``); empty: one block per weighted layer.
        x, y: the probe batch, the same rows every epoch.
    """

    def __init__(
        self,
        model: keras.Model,
        blocks: Mapping[str, Sequence[str]] | None,
        x: np.ndarray,
        y: np.ndarray,
    ) -> None:
        self.model = model
        self.x = x
        self.y = y
        self.notes: list[str] = []
        names = [layer.name for layer in _all_layers(model)]
        if not blocks:
            blocks = {layer.name: [layer.name] for layer in weighted_layers(model)}
        self.blocks = {block: [n for n in members if n in names] for block, members in blocks.items()}
        self.blocks = {block: members for block, members in self.blocks.items() if members}
        by_name = {layer.name: layer for layer in _all_layers(model)}
        self.parameters = {
            block: sum(_parameters(by_name[n]) for n in members) for block, members in self.blocks.items()
        }
        self.relu_layers = {
            block: [n for n in members if is_relu(by_name[n])] for block, members in self.blocks.items()
        }
        self._extractor, self._output_of = self._build_extractor(names)
        self._gradients = gradient_function(model)

    def _build_extractor(self, order: list[str]) -> tuple[keras.Model | None, dict[str, int]]:
        """A model returning each block's output (its last layer in the model's order) and each ReLU layer's.

        ``output_of`` maps a block name, and a ReLU layer's name, to its index among the outputs.
        """
        position = {name: i for i, name in enumerate(order)}
        outputs: list[Any] = []
        output_of: dict[str, int] = {}
        index_of_layer: dict[str, int] = {}

        def output(name: str) -> int:
            if name not in index_of_layer:
                index_of_layer[name] = len(outputs)
                outputs.append(self.model.get_layer(name).output)
            return index_of_layer[name]

        try:
            inputs = self.model.inputs
            inputs = inputs[0] if len(inputs) == 1 else inputs
            for block, members in self.blocks.items():
                output_of[block] = output(max(members, key=lambda n: position[n]))
            self._relu_output = {n: output(n) for layers in self.relu_layers.values() for n in layers}
            return keras.Model(inputs, outputs), output_of
        except (AttributeError, ValueError, TypeError, KeyError) as exc:
            self.notes.append(f"block activations unavailable: {exc}")
            self._relu_output = {}
            return None, {}

    def record(self, epoch: int) -> dict[str, Any]:
        """Diagnostics after ``epoch`` completed epochs (0 = before training)."""
        loss, grads = self._gradients(self.x, self.y)
        squares = _layer_squares(self.model, grads)
        activations: list[np.ndarray] = []
        if self._extractor is not None:
            # predict_on_batch compiles once (jit / tf.function): cheap at every epoch.
            result = self._extractor.predict_on_batch(self.x)
            result = result if isinstance(result, list | tuple) else [result]
            activations = [np.asarray(a, dtype=np.float64) for a in result]
        blocks: dict[str, dict[str, float | None]] = {}
        for block, members in self.blocks.items():
            entry: dict[str, float | None] = {
                "gradient_norm": math.sqrt(sum(squares.get(n, 0.0) for n in members)),
                "parameters": self.parameters[block],
            }
            if block in self._output_of:
                values = activations[self._output_of[block]]
                entry["activation_mean"] = float(values.mean())
                entry["activation_std"] = float(values.std())
                entry["units"] = int(values.shape[-1]) if values.ndim > 1 else 1
            relu_outputs = [
                activations[self._relu_output[n]] for n in self.relu_layers[block] if n in self._relu_output
            ]
            if relu_outputs:
                units = dead = 0
                for values in relu_outputs:
                    ever_active = (values.reshape(-1, values.shape[-1]) > 0).any(axis=0)
                    units += ever_active.size
                    dead += int(ever_active.size - ever_active.sum())
                entry["relu_units"] = units
                entry["dead_share"] = dead / units if units else 0.0
            blocks[block] = entry
        return {
            "epoch": epoch,
            "probe_rows": len(self.x),
            "probe_loss": float(keras.ops.convert_to_numpy(loss)),
            "gradient_norms": {name: math.sqrt(value) for name, value in squares.items()},
            "blocks": blocks,
        }


def _all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    return list(model.layers)

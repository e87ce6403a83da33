"""Multi-layer perceptron: a stack of Dense blocks."""

from __future__ import annotations

import keras

from models.blocks import activation_layer, flatten_if_needed
from models.spec import MlpArchitecture


def dense_block(
    x: keras.KerasTensor,
    units: int,
    activation: str,
    kernel_initializer: str,
    batch_norm: bool,
    dropout: float,
    name: str,
    leaky_relu_slope: float = 0.2,
) -> keras.KerasTensor:
    """Dense → [BatchNormalization] → activation → [Dropout].

    Args:
        x: input tensor, (batch, features).
        units: Dense units.
        activation: the spec's activation name.
        kernel_initializer: Keras initializer name.
        batch_norm: add BatchNormalization between Dense and activation.
        dropout: Dropout rate after the activation; 0 adds no layer.
        name: block name; layers are ``{name}_dense``, ``{name}_bn``, ``{name}_{activation}``,
            ``{name}_dropout``.
        leaky_relu_slope: negative slope for ``leaky_relu``.

    Returns:
        Output tensor of the block.
    """
    x = keras.layers.Dense(units, kernel_initializer=kernel_initializer, use_bias=not batch_norm, name=f"{name}_dense")(
        x
    )
    if batch_norm:
        x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    x = activation_layer(activation, f"{name}_{activation}", leaky_relu_slope)(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return x


def mlp_body(x: keras.KerasTensor, arch: MlpArchitecture) -> keras.KerasTensor:
    """The hidden layers of an MLP: blocks ``dense1`` … ``denseN``.

    Args:
        x: the preprocessed input.
        arch: the mlp architecture spec.

    Returns:
        The last hidden layer's output.
    """
    x = flatten_if_needed(x)
    for index, units in enumerate(arch.widths, start=1):
        x = dense_block(
            x,
            units,
            arch.activation,
            arch.kernel_initializer,
            arch.batch_norm,
            arch.dropout,
            name=f"dense{index}",
            leaky_relu_slope=arch.leaky_relu_slope,
        )
    return x

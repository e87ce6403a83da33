"""The course's mnist_cnn: Conv2D ×n → MaxPooling2D → Dropout → Flatten → Dense → Dropout."""

from __future__ import annotations

import keras

from models.blocks import activation_layer
from models.spec import CnnArchitecture


def conv_block(
    x: keras.KerasTensor,
    filters: int,
    kernel_size: int,
    activation: str,
    name: str,
    padding: str = "valid",
    kernel_initializer: str = "glorot_uniform",
    leaky_relu_slope: float = 0.2,
) -> keras.KerasTensor:
    """Conv2D → activation, layers ``{name}_conv`` and ``{name}_{activation}``.

    Args:
        x: input tensor, (batch, H, W, C).
        filters: Conv2D filters.
        kernel_size: square kernel size.
        activation: the spec's activation name.
        name: block name.
        padding: ``"valid"`` (the course's) or ``"same"``.
        kernel_initializer: initializer name.
        leaky_relu_slope: negative slope for ``leaky_relu``.

    Returns:
        Output tensor of the block.
    """
    x = keras.layers.Conv2D(
        filters, kernel_size, padding=padding, kernel_initializer=kernel_initializer, name=f"{name}_conv"
    )(x)
    return activation_layer(activation, f"{name}_{activation}", leaky_relu_slope)(x)


def cnn_body(x: keras.KerasTensor, arch: CnnArchitecture) -> keras.KerasTensor:
    """Blocks ``conv1`` … ``convN``, ``pool`` (max pool + dropout), ``flatten``, ``dense1``.

    Args:
        x: the preprocessed input, (batch, H, W, C).
        arch: the cnn spec.

    Returns:
        The output of the hidden Dense block.
    """
    for index, filters in enumerate(arch.filters, start=1):
        x = conv_block(
            x,
            filters,
            arch.kernel_size,
            arch.activation,
            name=f"conv{index}",
            padding=arch.padding,
            kernel_initializer=arch.kernel_initializer,
            leaky_relu_slope=arch.leaky_relu_slope,
        )
    x = keras.layers.MaxPooling2D(pool_size=arch.pool_size, name="pool_max")(x)
    if arch.dropout > 0:
        x = keras.layers.Dropout(arch.dropout, name="pool_dropout")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(arch.dense_units, kernel_initializer=arch.kernel_initializer, name="dense1_dense")(x)
    x = activation_layer(arch.activation, f"dense1_{arch.activation}", arch.leaky_relu_slope)(x)
    if arch.dense_dropout > 0:
        x = keras.layers.Dropout(arch.dense_dropout, name="dense1_dropout")(x)
    return x



"""The course's mnist_cnn: Conv2D ×n → MaxPooling2D → Dropout → Flatten → Dense → Dropout."""

from __future__ import annotations

import keras

from models.blocks import activation_layer
from models.errors import Problem
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


def cnn_shape_problems(arch: CnnArchitecture, image_hw: tuple[int, int]) -> list[Problem]:
    """Why the convolutions and pooling would shrink an H×W image to nothing (empty when they fit).

    Args:
        arch: the cnn spec.
        image_hw: the input's height and width.

    Returns:
        Problems naming ``architecture.kernel_size`` or ``architecture.pool_size``.
    """
    height, width = image_hw
    if arch.padding == "valid":
        shrink = (arch.kernel_size - 1) * len(arch.filters)
        height, width = height - shrink, width - shrink
        if min(height, width) < 1:
            return [
                Problem(
                    "input_shape_mismatch",
                    f"architecture.kernel_size: {len(arch.filters)} 'valid' convolutions of size "
                    f"{arch.kernel_size} need images larger than {shrink}×{shrink}; the data's are "
                    f"{image_hw[0]}×{image_hw[1]} (use padding 'same' or a smaller kernel). "
                    f"Received: kernel_size={arch.kernel_size}",
                    "architecture.kernel_size",
                )
            ]
    if min(height, width) < arch.pool_size:
        return [
            Problem(
                "input_shape_mismatch",
                f"architecture.pool_size: the feature maps before pooling are {height}×{width}, smaller "
                f"than the pool. Received: pool_size={arch.pool_size}",
                "architecture.pool_size",
            )
        ]
    return []

"""Highway networks (Srivastava et al. 2015) from built-in layers only: ``y = x + T·(H − x)``."""

from __future__ import annotations

import keras

from models.blocks import activation_layer, flatten_if_needed, project_to_width
from models.spec import HighwayArchitecture


def highway_block(
    x: keras.KerasTensor,
    width: int,
    activation: str,
    transform_bias: float,
    name: str,
    kernel_initializer: str = "glorot_uniform",
    dropout: float = 0.0,
    leaky_relu_slope: float = 0.2,
) -> keras.KerasTensor:
    """One highway block, ``H·T + x·(1 − T)`` written as ``x + T·(H − x)``.

    Args:
        x: input tensor, (batch, width): the carry path needs the block's width.
        width: units of H and T.
        activation: activation of H.
        transform_bias: initial bias of the gate T; negative so a fresh block carries its input.
        name: block name; layers are ``{name}_h``, ``{name}_h_{activation}`` (leaky_relu only),
            ``{name}_t``, ``{name}_h_minus_x``, ``{name}_gated``, ``{name}_add``, ``{name}_dropout``.
        kernel_initializer: initializer of both Dense kernels.
        dropout: Dropout rate after the block; 0 adds no layer.
        leaky_relu_slope: negative slope for ``leaky_relu``.

    Returns:
        Output tensor, (batch, width).

    Raises:
        ValueError: if ``x`` is not (batch, width).
    """
    if x.shape[-1] != width or len(x.shape) != 2:
        raise ValueError(f"A highway block needs (batch, {width}) input. Received: shape={x.shape}")
    if activation == "leaky_relu":
        h = keras.layers.Dense(width, kernel_initializer=kernel_initializer, name=f"{name}_h")(x)
        h = activation_layer(activation, f"{name}_h_{activation}", leaky_relu_slope)(h)
    else:
        h = keras.layers.Dense(width, activation=activation, kernel_initializer=kernel_initializer, name=f"{name}_h")(x)
    t = keras.layers.Dense(
        width,
        activation="sigmoid",
        kernel_initializer=kernel_initializer,
        bias_initializer=keras.initializers.Constant(transform_bias),
        name=f"{name}_t",
    )(x)
    h_minus_x = keras.layers.Subtract(name=f"{name}_h_minus_x")([h, x])
    gated = keras.layers.Multiply(name=f"{name}_gated")([t, h_minus_x])
    y = keras.layers.Add(name=f"{name}_add")([x, gated])
    if dropout > 0:
        y = keras.layers.Dropout(dropout, name=f"{name}_dropout")(y)
    return y


def highway_body(x: keras.KerasTensor, arch: HighwayArchitecture) -> keras.KerasTensor:
    """Blocks ``highway1`` … ``highwayN``, after a Dense projection (block ``proj``) when the input
    width differs from ``arch.width``.

    Args:
        x: the preprocessed input (flattened here when not a vector).
        arch: the highway architecture spec.

    Returns:
        The last block's output, (batch, width).
    """
    x = flatten_if_needed(x)
    x = project_to_width(
        x,
        arch.width,
        arch.activation,
        "proj",
        kernel_initializer=arch.kernel_initializer,
        leaky_relu_slope=arch.leaky_relu_slope,
    )
    for index in range(1, arch.depth + 1):
        x = highway_block(
            x,
            arch.width,
            arch.activation,
            arch.transform_bias,
            name=f"highway{index}",
            kernel_initializer=arch.kernel_initializer,
            dropout=arch.dropout,
            leaky_relu_slope=arch.leaky_relu_slope,
        )
    return x

"""Residual networks: dense residual blocks for vectors, basic/bottleneck conv blocks for images.

Conv layer names follow keras.applications (``src/applications/resnet.py``): block ``stage2_block1``
has ``stage2_block1_1_conv``, ``..._1_bn``, ``..._1_relu``, …, ``..._add``, ``..._out``, and its
projection shortcut ``..._0_conv`` / ``..._0_bn``.
"""

from __future__ import annotations

import keras

from models.blocks import activation_layer, flatten_if_needed, project_to_width
from models.spec import ResnetConvArchitecture, ResnetDenseArchitecture

BN_EPSILON = 1.001e-5  # keras.applications' value


def dense_residual_block(
    x: keras.KerasTensor,
    width: int,
    activation: str,
    batch_norm: bool,
    name: str,
    kernel_initializer: str = "he_normal",
    dropout: float = 0.0,
    leaky_relu_slope: float = 0.2,
) -> keras.KerasTensor:
    """Dense → [BN] → act → [Dropout] → Dense → [BN] → Add(x) → act.

    Args:
        x: input tensor, (batch, width).
        width: units of both Dense layers.
        activation: the spec's activation name.
        batch_norm: add BatchNormalization after each Dense.
        name: block name; layers ``{name}_1_dense``, ``{name}_1_bn``, ``{name}_1_{act}``,
            ``{name}_dropout``, ``{name}_2_dense``, ``{name}_2_bn``, ``{name}_add``, ``{name}_out``.
        kernel_initializer: initializer of the Dense kernels.
        dropout: rate between the two Dense layers; 0 adds no layer.
        leaky_relu_slope: negative slope for ``leaky_relu``.

    Returns:
        Output tensor, (batch, width).
    """
    shortcut = x
    for step in (1, 2):
        x = keras.layers.Dense(
            width, kernel_initializer=kernel_initializer, use_bias=not batch_norm, name=f"{name}_{step}_dense"
        )(x)
        if batch_norm:
            x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_{step}_bn")(x)
        if step == 1:
            x = activation_layer(activation, f"{name}_1_{activation}", leaky_relu_slope)(x)
            if dropout > 0:
                x = keras.layers.Dropout(dropout, name=f"{name}_dropout")(x)
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return activation_layer(activation, f"{name}_out", leaky_relu_slope)(x)


def resnet_dense_body(x: keras.KerasTensor, arch: ResnetDenseArchitecture) -> keras.KerasTensor:
    """Blocks ``block1`` … ``blockN`` after a ``stem`` projection when the input width differs.

    Args:
        x: the preprocessed input (flattened here when not a vector).
        arch: the dense resnet spec.

    Returns:
        The last block's output.
    """
    x = flatten_if_needed(x)
    x = project_to_width(
        x,
        arch.width,
        arch.activation,
        "stem",
        kernel_initializer=arch.kernel_initializer,
        leaky_relu_slope=arch.leaky_relu_slope,
    )
    for index in range(1, arch.blocks + 1):
        x = dense_residual_block(
            x,
            arch.width,
            arch.activation,
            arch.batch_norm,
            name=f"block{index}",
            kernel_initializer=arch.kernel_initializer,
            dropout=arch.dropout,
            leaky_relu_slope=arch.leaky_relu_slope,
        )
    return x


def needs_projection(in_channels: int, out_channels: int, stride: int) -> bool:
    """Whether a block's shortcut must be a 1×1 conv: the identity only fits unchanged shapes."""
    return stride != 1 or in_channels != out_channels


def _conv_bn_act(
    x: keras.KerasTensor,
    filters: int,
    kernel_size: int,
    stride: int,
    name: str,
    arch: ResnetConvArchitecture,
    activate: bool = True,
) -> keras.KerasTensor:
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        padding="same",
        kernel_initializer=arch.kernel_initializer,
        name=f"{name}_conv",
    )(x)
    if arch.batch_norm:
        x = keras.layers.BatchNormalization(axis=3, epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    if activate:
        x = activation_layer(arch.activation, f"{name}_{arch.activation}", arch.leaky_relu_slope)(x)
    return x


def residual_conv_block(
    x: keras.KerasTensor,
    filters: int,
    stride: int,
    name: str,
    arch: ResnetConvArchitecture,
) -> keras.KerasTensor:
    """A basic (3×3, 3×3) or bottleneck (1×1, 3×3, 1×1·4) block, as ``arch.block`` says.

    Args:
        x: input tensor, (batch, H, W, C).
        filters: the block's filters (a bottleneck block outputs ``4 * filters`` channels).
        stride: stride of the first conv (and of the projection shortcut).
        name: block name, e.g. ``stage2_block1``.
        arch: supplies block type, kernel size, activation, batch norm and initializer.

    Returns:
        Output tensor of the block.
    """
    out_channels = 4 * filters if arch.block == "bottleneck" else filters
    if needs_projection(x.shape[-1], out_channels, stride):
        shortcut = _conv_bn_act(x, out_channels, 1, stride, f"{name}_0", arch, activate=False)
    else:
        shortcut = x
    if arch.block == "bottleneck":
        y = _conv_bn_act(x, filters, 1, stride, f"{name}_1", arch)
        y = _conv_bn_act(y, filters, arch.kernel_size, 1, f"{name}_2", arch)
        y = _conv_bn_act(y, out_channels, 1, 1, f"{name}_3", arch, activate=False)
    else:
        y = _conv_bn_act(x, filters, arch.kernel_size, stride, f"{name}_1", arch)
        y = _conv_bn_act(y, filters, arch.kernel_size, 1, f"{name}_2", arch, activate=False)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return activation_layer(arch.activation, f"{name}_out", arch.leaky_relu_slope)(y)


def stack_residual_blocks(
    x: keras.KerasTensor, filters: int, blocks: int, stride1: int, name: str, arch: ResnetConvArchitecture
) -> keras.KerasTensor:
    """One stage: ``blocks`` residual blocks, the first with stride ``stride1``.

    Args:
        x: input tensor.
        filters: filters of every block in the stage.
        blocks: number of blocks.
        stride1: stride of the first block.
        name: stage label, e.g. ``stage2``; blocks are ``{name}_block1`` …
        arch: the conv resnet spec.

    Returns:
        Output tensor of the stage.
    """
    x = residual_conv_block(x, filters, stride1, f"{name}_block1", arch)
    for index in range(2, blocks + 1):
        x = residual_conv_block(x, filters, 1, f"{name}_block{index}", arch)
    return x


def resnet_conv_body(x: keras.KerasTensor, arch: ResnetConvArchitecture) -> keras.KerasTensor:
    """Stem conv, stages ``stage1`` … (every stage after the first halves H and W), global average pool.

    Args:
        x: the preprocessed input, (batch, H, W, C).
        arch: the conv resnet spec.

    Returns:
        The pooled features, (batch, channels of the last stage).
    """
    x = _conv_bn_act(x, arch.stem_filters or arch.filters[0], arch.kernel_size, 1, "stem", arch)
    for index, (blocks, filters) in enumerate(zip(arch.stages, arch.filters, strict=True), start=1):
        x = stack_residual_blocks(x, filters, blocks, 1 if index == 1 else 2, f"stage{index}", arch)
    return keras.layers.GlobalAveragePooling2D(name="pool")(x)

"""Building blocks of each architecture family, one module per family, plus helpers they share.

Every block is a plain function ``block(x, ..., name)`` that names its layers ``f"{name}_..."`` (as
keras.applications does), so the layers of one block share a prefix that diagnostics group by.
Only built-in Keras layers are used: a model saves to ``.h5`` and loads with plain
``keras.models.load_model`` in safe mode, without custom objects.
"""

from __future__ import annotations

import keras


def activation_layer(activation: str, name: str, leaky_relu_slope: float = 0.2) -> keras.layers.Layer:
    """A layer applying ``activation``: ``LeakyReLU`` for leaky_relu, else ``Activation``.

    Args:
        activation: one of the spec's activation names.
        name: the layer's name.
        leaky_relu_slope: negative slope, used only for ``"leaky_relu"``.

    Returns:
        An unconnected Keras layer.
    """
    if activation == "leaky_relu":
        return keras.layers.LeakyReLU(negative_slope=leaky_relu_slope, name=name)
    return keras.layers.Activation(activation, name=name)


def flatten_if_needed(x: keras.KerasTensor, name: str = "input_flatten") -> keras.KerasTensor:
    """Flatten ``x`` to one feature axis when it has more than one.

    Args:
        x: a batch of samples of any rank.
        name: the Flatten layer's name.

    Returns:
        ``x`` itself when already (batch, features), else its flattened form.
    """
    if len(x.shape) > 2:
        return keras.layers.Flatten(name=name)(x)
    return x


def project_to_width(
    x: keras.KerasTensor,
    width: int,
    activation: str,
    name: str,
    *,
    kernel_initializer: str,
    leaky_relu_slope: float,
) -> keras.KerasTensor:
    """Dense + activation to ``width`` features when ``x`` has another width (block ``name``), else ``x``.

    Highway and residual blocks add their input to their output, so the input must already be ``width``
    wide.
    """
    if x.shape[-1] == width:
        return x
    x = keras.layers.Dense(width, kernel_initializer=kernel_initializer, name=f"{name}_dense")(x)
    return activation_layer(activation, f"{name}_{activation}", leaky_relu_slope)(x)


def to_image(x: keras.KerasTensor, name: str = "input_reshape") -> keras.KerasTensor:
    """Add a channel axis to (H, W) samples; (H, W, C) samples pass unchanged.

    Args:
        x: a batch of rank-2 or rank-3 samples.
        name: the Reshape layer's name.

    Returns:
        A (batch, H, W, C) tensor.
    """
    if len(x.shape) == 3:
        return keras.layers.Reshape((*x.shape[1:], 1), name=name)(x)
    return x

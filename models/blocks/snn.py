"""Self-normalizing networks (Klambauer et al. 2017): selu, lecun_normal, AlphaDropout.

The recipe (bioinf-jku/SNNs) also needs standardized inputs; the builder always puts a Normalization
layer holding the training data's mean and variance in front of an SNN.
"""

from __future__ import annotations

import keras

from core.errors import Problem
from models.blocks import activation_layer, flatten_if_needed
from models.spec import SnnArchitecture


def snn_block(
    x: keras.KerasTensor,
    units: int,
    name: str,
    activation: str = "selu",
    kernel_initializer: str = "lecun_normal",
    alpha_dropout: float = 0.05,
    batch_norm: bool = False,
    dropout: float = 0.0,
    leaky_relu_slope: float = 0.2,
) -> keras.KerasTensor:
    """Dense → [BN] → activation → [Dropout] → [AlphaDropout].

    BN, plain Dropout, other activations and initializers are allowed but break self-normalization;
    :func:`models.dryrun.dry_run` warns about them.

    Args:
        x: input tensor, (batch, features).
        units: Dense units.
        name: block name; layers ``{name}_dense``, ``{name}_bn``, ``{name}_{activation}``,
            ``{name}_dropout``, ``{name}_alpha_dropout``.
        activation: activation name (``selu`` for an SNN).
        kernel_initializer: initializer name (``lecun_normal`` for an SNN).
        alpha_dropout: AlphaDropout rate; 0 adds no layer.
        batch_norm: add BatchNormalization (not part of the recipe).
        dropout: plain Dropout rate (not part of the recipe); 0 adds no layer.
        leaky_relu_slope: negative slope for ``leaky_relu``.

    Returns:
        Output tensor of the block.
    """
    x = keras.layers.Dense(units, kernel_initializer=kernel_initializer, name=f"{name}_dense")(x)
    if batch_norm:
        x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    x = activation_layer(activation, f"{name}_{activation}", leaky_relu_slope)(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name=f"{name}_dropout")(x)
    if alpha_dropout > 0:
        x = keras.layers.AlphaDropout(alpha_dropout, name=f"{name}_alpha_dropout")(x)
    return x


def snn_body(x: keras.KerasTensor, arch: SnnArchitecture) -> keras.KerasTensor:
    """Blocks ``snn1`` … ``snnN``.

    Args:
        x: the standardized input (flattened here when not a vector).
        arch: the snn spec.

    Returns:
        The last block's output.
    """
    x = flatten_if_needed(x)
    for index, units in enumerate(arch.widths, start=1):
        x = snn_block(
            x,
            units,
            name=f"snn{index}",
            activation=arch.activation,
            kernel_initializer=arch.kernel_initializer,
            alpha_dropout=arch.alpha_dropout,
            batch_norm=arch.batch_norm,
            dropout=arch.dropout,
            leaky_relu_slope=arch.leaky_relu_slope,
        )
    return x


def snn_warnings(arch: SnnArchitecture) -> list[Problem]:
    """Departures from the SNN recipe that the spec allows but that break self-normalization.

    Args:
        arch: the snn spec.

    Returns:
        One warning per departure (empty for the plain recipe).
    """
    warnings = []
    if arch.batch_norm:
        warnings.append(
            Problem(
                "snn_batch_norm",
                "architecture.batch_norm: BatchNormalization is not part of an SNN; selu self-normalizes. "
                "Received: batch_norm=True",
                "architecture.batch_norm",
            )
        )
    if arch.dropout > 0:
        warnings.append(
            Problem(
                "snn_dropout",
                "architecture.dropout: plain Dropout breaks self-normalization; use alpha_dropout. "
                f"Received: dropout={arch.dropout}",
                "architecture.dropout",
            )
        )
    if arch.activation != "selu":
        warnings.append(
            Problem(
                "snn_activation",
                "architecture.activation: an SNN needs 'selu' to self-normalize. "
                f"Received: activation={arch.activation!r}",
                "architecture.activation",
            )
        )
    if arch.kernel_initializer != "lecun_normal":
        warnings.append(
            Problem(
                "snn_initializer",
                "architecture.kernel_initializer: an SNN needs 'lecun_normal' to self-normalize. "
                f"Received: kernel_initializer={arch.kernel_initializer!r}",
                "architecture.kernel_initializer",
            )
        )
    return warnings

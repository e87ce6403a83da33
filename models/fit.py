"""Whether a job spec fits a checked data set, without Keras: what ``build_model`` would refuse.

The API calls :func:`spec_data_problems` when a job is submitted, so a spec that cannot fit its data set
is refused with every reason at once instead of failing later on a worker; ``build_model`` runs the same
checks before it builds anything. A ``keras_json`` model's config is walked here too (``models.keras_config``).
"""

from __future__ import annotations

from core.errors import Problem, SpecError
from models.data.summary import DatasetSummary
from models.heads import resolve_head
from models.keras_config import FIELD, config_problems
from models.keras_size import keras_json_size
from models.spec import CnnArchitecture, JobSpec, KerasJsonArchitecture, ResnetConvArchitecture

IMAGE_FAMILIES: dict[type, str] = {CnnArchitecture: "cnn", ResnetConvArchitecture: "resnet (variant conv)"}


def spec_data_problems(spec: JobSpec, summary: DatasetSummary) -> list[Problem]:
    """Every way ``spec`` does not fit the data ``summary`` describes (empty when it fits).

    Args:
        spec: the validated job spec.
        summary: the data set's summary, checked with the spec's own ``data`` keys.

    Returns:
        Problems naming the spec field (``architecture.family``, ``output.units``, ``loss``, ...).
    """
    arch = spec.architecture
    if isinstance(arch, KerasJsonArchitecture):
        problems = config_problems(arch.config())  # the safe-mode walk: refused at submit, not in a trainer
        if problems:
            return problems
        problems = keras_json_shape_problems(arch, list(summary.input_shape), summary.output_dim)
        if problems:
            return problems
    problems = input_problems(spec, list(summary.input_shape))
    try:
        resolve_head(spec, summary)
    except SpecError as exc:
        problems.extend(exc.problems)
    return problems


def keras_json_shape_problems(arch: KerasJsonArchitecture, input_shape: list[int], output_dim: int) -> list[Problem]:
    """What the trainer would refuse in a keras_json model, found from its config: a layer that cannot be
    sized, not one input and one output, an input or output shape that does not fit the data.

    The messages are the trainer's own (``models.blocks.keras_json``), so submit and trainer refuse alike.
    """
    try:
        size = keras_json_size(arch.config(), input_shape)
    except SpecError as exc:
        return exc.problems
    problems = []
    if size.declared_input is None:
        problems.append(
            Problem(
                "keras_json_invalid",
                f"{FIELD}: the model has no input shape; build it from keras.Input(shape=...) before "
                "calling to_json()",
                FIELD,
            )
        )
    elif size.declared_input != list(input_shape):
        problems.append(
            Problem(
                "input_shape_mismatch",
                f"{FIELD}: the model's input shape {size.declared_input} differs from the data's X_train sample "
                f"shape {list(input_shape)}. Received: input_shape={size.declared_input}",
                FIELD,
            )
        )
    if list(size.output_shape) != [output_dim]:
        problems.append(
            Problem(
                "output_mismatch",
                f"{FIELD}: the model's output shape {list(size.output_shape)} differs from the [{output_dim}] the "
                f"data's Y_train needs. Received: output_shape={list(size.output_shape)}",
                FIELD,
            )
        )
    return problems


def input_problems(spec: JobSpec, input_shape: list[int]) -> list[Problem]:
    arch = spec.architecture
    problems = []
    if arch.input_shape is not None and list(arch.input_shape) != list(input_shape):
        problems.append(
            Problem(
                "input_shape_mismatch",
                f"architecture.input_shape: the data's X_train samples have shape {list(input_shape)}. "
                f"Received: input_shape={list(arch.input_shape)}",
                "architecture.input_shape",
            )
        )
    family = IMAGE_FAMILIES.get(type(arch))
    if family is not None:
        shape_problems = image_shape_problems(family, input_shape)
        problems.extend(shape_problems)
        if not shape_problems and isinstance(arch, CnnArchitecture):
            problems.extend(cnn_shape_problems(arch, (input_shape[0], input_shape[1])))
    return problems


def image_shape_problems(family: str, input_shape: list[int] | tuple[int, ...]) -> list[Problem]:
    """Why an input shape cannot feed a convolutional family (empty when it can).

    Args:
        family: the family's name for the message (``"cnn"``, ``"resnet (conv)"``).
        input_shape: per-sample input shape.

    Returns:
        Problems naming ``architecture.family`` and the shape received.
    """
    if len(input_shape) in (2, 3):
        return []
    return [
        Problem(
            "input_shape_mismatch",
            f"architecture.family: {family} needs image-shaped samples, (H, W) or (H, W, C); the data's "
            f"X_train samples have shape {list(input_shape)} (use mlp/highway/resnet dense/snn for vectors, "
            "or store X as images). Received: input_shape="
            f"{list(input_shape)}",
            "architecture.family",
        )
    ]


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

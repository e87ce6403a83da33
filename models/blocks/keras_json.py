"""Models given as ``model.to_json()`` output, accepted only when made of built-in Keras classes.

The config is walked BEFORE anything is deserialized (:func:`models.keras_config.config_problems`, a
Keras-free walk the API also runs at submit): every object in it must be a built-in layer, model,
initializer, regularizer, constraint or dtype policy. What passes is then deserialized with
``safe_mode=True`` as a second line of defence.
"""

from __future__ import annotations

import keras

from core.errors import Problem, SpecError
from models.keras_config import FIELD, config_problems
from models.spec import KerasJsonArchitecture

__all__ = ["config_problems", "keras_json_model"]


def keras_json_model(arch: KerasJsonArchitecture, input_shape: list[int], output_dim: int) -> keras.Model:
    """Deserialize the spec's model in safe mode and check it fits the data.

    Args:
        arch: the keras_json spec.
        input_shape: the data's per-sample input shape.
        output_dim: the output units the data needs.

    Returns:
        The (uncompiled, freshly initialised) model.

    Raises:
        SpecError: a refused class (naming the layer), a config Keras cannot deserialize, or a model
            whose input or output shape does not fit the data.
    """
    config = arch.config()
    problems = config_problems(config)
    if problems:
        raise SpecError(problems)
    try:
        model = keras.saving.deserialize_keras_object(config, safe_mode=True)
    except Exception as exc:  # Keras raises TypeError/ValueError/KeyError for bad configs
        raise SpecError(
            [Problem("keras_json_invalid", f"{FIELD}: Keras cannot build this model: {str(exc)[:300]}", FIELD)]
        ) from exc
    if not model.built or not model.inputs:
        raise SpecError(
            [
                Problem(
                    "keras_json_invalid",
                    f"{FIELD}: the model has no input shape; build it from keras.Input(shape=...) before "
                    "calling to_json()",
                    FIELD,
                )
            ]
        )
    problems = []
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        problems.append(
            Problem(
                "keras_json_invalid",
                f"{FIELD}: expected one input and one output. Received: {len(model.inputs)} input(s), "
                f"{len(model.outputs)} output(s)",
                FIELD,
            )
        )
    else:
        model_input = list(model.inputs[0].shape[1:])
        if model_input != list(input_shape):
            problems.append(
                Problem(
                    "input_shape_mismatch",
                    f"{FIELD}: the model's input shape {model_input} differs from the data's X_train sample "
                    f"shape {list(input_shape)}. Received: input_shape={model_input}",
                    FIELD,
                )
            )
        model_output = list(model.outputs[0].shape[1:])
        if model_output != [output_dim]:
            problems.append(
                Problem(
                    "output_mismatch",
                    f"{FIELD}: the model's output shape {model_output} differs from the [{output_dim}] the "
                    f"data's Y_train needs. Received: output_shape={model_output}",
                    FIELD,
                )
            )
    if problems:
        raise SpecError(problems)
    return model

"""Models given as ``model.to_json()`` output, accepted only when made of built-in Keras classes.

The config is walked BEFORE anything is deserialized: every object in it must be a built-in layer,
model, initializer, regularizer, constraint or dtype policy. ``Lambda`` (arbitrary Python code), custom
(registered) and unknown classes are refused with the layer's name and class. What passes is then
deserialized with ``safe_mode=True`` as a second line of defence.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

import keras

from core.errors import Problem, SpecError
from models.spec import KerasJsonArchitecture

FIELD = "architecture.model_json"
# Built-in layers that run code given by the user or wrap a foreign framework's module.
REFUSED_LAYERS = frozenset({"Lambda", "TFSMLayer", "TorchModuleWrapper", "JaxLayer", "FlaxLayer", "Layer"})
MODEL_CLASSES = frozenset({"Functional", "Sequential"})
# Serialization markers for plain values (tuples, arrays); they build data, never call user code.
VALUE_MARKERS = frozenset({"__tuple__", "__numpy__", "__tensor__"})
DTYPE_POLICIES = frozenset({"DTypePolicy", "FloatDTypePolicy"})


@cache
def builtin_layer_classes() -> frozenset[str]:
    """Class names of the layers in ``keras.layers``, minus those in :data:`REFUSED_LAYERS`."""
    return frozenset(
        name
        for name, obj in vars(keras.layers).items()
        if inspect.isclass(obj) and issubclass(obj, keras.layers.Layer) and name not in REFUSED_LAYERS
    )


@cache
def _namespace_classes(module: str) -> frozenset[str]:
    namespace = {
        "keras.initializers": keras.initializers,
        "keras.regularizers": keras.regularizers,
        "keras.constraints": keras.constraints,
    }[module]
    return frozenset(name for name, obj in vars(namespace).items() if inspect.isclass(obj))


def _refusal(obj: dict[str, Any]) -> str | None:
    """Why one serialized object is refused, or None when it is a built-in Keras class."""
    class_name = obj.get("class_name")
    module = obj.get("module")
    registered = obj.get("registered_name")
    if class_name in ("Lambda", "__lambda__"):
        return "Lambda layers run arbitrary Python code and are refused"
    if class_name in REFUSED_LAYERS:
        return "this layer runs code from outside the model config and is refused"
    if registered not in (None, class_name):
        return f"custom class (registered_name={registered!r}) needs code gpuyard does not load"
    if class_name in VALUE_MARKERS:
        return None
    if not isinstance(module, str) or not (module == "keras" or module.startswith("keras.")):
        return f"not a built-in Keras class (module={module!r})"
    if module == "keras.layers":
        return None if class_name in builtin_layer_classes() else "unknown layer class, not in keras.layers"
    if class_name in MODEL_CLASSES and (module in ("keras", "keras.models") or module.startswith("keras.src.")):
        return None
    if module == "keras" and class_name in DTYPE_POLICIES:
        return None
    if module in ("keras.initializers", "keras.regularizers", "keras.constraints"):
        return None if class_name in _namespace_classes(module) else f"unknown class in {module}"
    return f"not an allowed Keras class (module={module!r})"


def _walk(node: Any, layer: str, problems: list[Problem]) -> None:
    """Check every serialized object under ``node``; ``layer`` names the layer holding it."""
    if isinstance(node, list):
        for item in node:
            _walk(item, layer, problems)
        return
    if not isinstance(node, dict):
        return
    if "class_name" in node:
        config = node.get("config")
        if isinstance(config, dict) and isinstance(config.get("name"), str):
            layer = config["name"]
        reason = _refusal(node)
        if reason:
            class_name = node.get("class_name")
            problems.append(
                Problem(
                    "keras_json_refused",
                    f"{FIELD}: layer {layer!r} ({class_name}): {reason}. Only built-in Keras layers are "
                    f"accepted. Received: class_name={class_name!r}",
                    FIELD,
                )
            )
            return  # what a refused object holds (a Lambda's code) is refused with it
    for value in node.values():
        _walk(value, layer, problems)


def config_problems(config: dict[str, Any]) -> list[Problem]:
    """Every object in a model config that is not a built-in Keras class, naming its layer.

    Args:
        config: the parsed ``model.to_json()`` output.

    Returns:
        One problem per refused object (empty when the whole config is built-in).
    """
    problems: list[Problem] = []
    _walk(config, "(model)", problems)
    return problems


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
    if config.get("class_name") not in MODEL_CLASSES:
        raise SpecError(
            [
                Problem(
                    "keras_json_invalid",
                    f"{FIELD}: expected a Sequential or Functional model. "
                    f"Received: class_name={config.get('class_name')!r}",
                    FIELD,
                )
            ]
        )
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

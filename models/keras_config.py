"""The safe-mode walk of a ``model.to_json()`` config: pure JSON, no Keras import, so the API can run it.

Every object in the config must be a built-in Keras layer, model, initializer, regularizer, constraint,
dtype policy or a serialization marker for plain values (``__tuple__``, ``__keras_tensor__``, which
Functional configs use in ``inbound_nodes`` to name another layer's output). ``Lambda`` (arbitrary Python
code), custom (registered) and unknown classes are refused with the layer's name and class, as is a
config that is not shaped like a Sequential or Functional model.

The class lists are Keras 3.15's (``tests/models/test_keras_json.py`` checks them against the installed
Keras, so an upgrade that adds a layer shows up as a failing test, not a silent refusal).
"""

from __future__ import annotations

from typing import Any

from core.errors import Problem

FIELD = "architecture.model_json"
# Built-in layers that run code given by the user or wrap a foreign framework's module.
REFUSED_LAYERS = frozenset({"Lambda", "TFSMLayer", "TorchModuleWrapper", "JaxLayer", "FlaxLayer", "Layer"})
MODEL_CLASSES = frozenset({"Functional", "Sequential"})
# Serialization markers for plain values (tuples, arrays, a reference to another layer's output tensor);
# Keras turns them into data, never into a call of user code.
VALUE_MARKERS = frozenset({"__tuple__", "__numpy__", "__tensor__", "__keras_tensor__", "__slice__", "__ellipsis__"})
DTYPE_POLICIES = frozenset({"DTypePolicy", "FloatDTypePolicy"})

BUILTIN_LAYERS = frozenset(
    {
        "Activation",
        "ActivityRegularization",
        "AdaptiveAveragePooling1D",
        "AdaptiveAveragePooling2D",
        "AdaptiveAveragePooling3D",
        "AdaptiveMaxPooling1D",
        "AdaptiveMaxPooling2D",
        "AdaptiveMaxPooling3D",
        "Add",
        "AdditiveAttention",
        "AlphaDropout",
        "Attention",
        "AugMix",
        "AutoContrast",
        "Average",
        "AveragePooling1D",
        "AveragePooling2D",
        "AveragePooling3D",
        "AvgPool1D",
        "AvgPool2D",
        "AvgPool3D",
        "BatchNormalization",
        "Bidirectional",
        "CategoryEncoding",
        "CenterCrop",
        "Concatenate",
        "ContrastLimitedAdaptiveHistogramEqualization",
        "Conv1D",
        "Conv1DTranspose",
        "Conv2D",
        "Conv2DTranspose",
        "Conv3D",
        "Conv3DTranspose",
        "ConvLSTM1D",
        "ConvLSTM2D",
        "ConvLSTM3D",
        "Convolution1D",
        "Convolution1DTranspose",
        "Convolution2D",
        "Convolution2DTranspose",
        "Convolution3D",
        "Convolution3DTranspose",
        "Cropping1D",
        "Cropping2D",
        "Cropping3D",
        "CutMix",
        "Dense",
        "DepthwiseConv1D",
        "DepthwiseConv2D",
        "Discretization",
        "Dot",
        "Dropout",
        "ELU",
        "EinsumDense",
        "Embedding",
        "Equalization",
        "Flatten",
        "GRU",
        "GRUCell",
        "GaussianDropout",
        "GaussianNoise",
        "GlobalAveragePooling1D",
        "GlobalAveragePooling2D",
        "GlobalAveragePooling3D",
        "GlobalAvgPool1D",
        "GlobalAvgPool2D",
        "GlobalAvgPool3D",
        "GlobalMaxPool1D",
        "GlobalMaxPool2D",
        "GlobalMaxPool3D",
        "GlobalMaxPooling1D",
        "GlobalMaxPooling2D",
        "GlobalMaxPooling3D",
        "GroupNormalization",
        "GroupQueryAttention",
        "HashedCrossing",
        "Hashing",
        "Identity",
        "InputLayer",
        "IntegerLookup",
        "LSTM",
        "LSTMCell",
        "LayerNormalization",
        "LeakyReLU",
        "Masking",
        "MaxNumBoundingBoxes",
        "MaxPool1D",
        "MaxPool2D",
        "MaxPool3D",
        "MaxPooling1D",
        "MaxPooling2D",
        "MaxPooling3D",
        "Maximum",
        "MelSpectrogram",
        "Minimum",
        "MixUp",
        "MultiHeadAttention",
        "Multiply",
        "Normalization",
        "PReLU",
        "Permute",
        "Pipeline",
        "RMSNormalization",
        "RNN",
        "RandAugment",
        "RandomBrightness",
        "RandomColorDegeneration",
        "RandomColorJitter",
        "RandomContrast",
        "RandomCrop",
        "RandomElasticTransform",
        "RandomErasing",
        "RandomFlip",
        "RandomGaussianBlur",
        "RandomGrayscale",
        "RandomHue",
        "RandomInvert",
        "RandomPerspective",
        "RandomPosterization",
        "RandomRotation",
        "RandomSaturation",
        "RandomSharpness",
        "RandomShear",
        "RandomTranslation",
        "RandomZoom",
        "ReLU",
        "RepeatVector",
        "Rescaling",
        "Reshape",
        "Resizing",
        "ReversibleEmbedding",
        "STFTSpectrogram",
        "SeparableConv1D",
        "SeparableConv2D",
        "SeparableConvolution1D",
        "SeparableConvolution2D",
        "SimpleRNN",
        "SimpleRNNCell",
        "Softmax",
        "Solarization",
        "SpatialDropout1D",
        "SpatialDropout2D",
        "SpatialDropout3D",
        "SpectralNormalization",
        "StackedRNNCells",
        "StringLookup",
        "Subtract",
        "TextVectorization",
        "TimeDistributed",
        "UnitNormalization",
        "UpSampling1D",
        "UpSampling2D",
        "UpSampling3D",
        "Wrapper",
        "ZeroPadding1D",
        "ZeroPadding2D",
        "ZeroPadding3D",
    }
)
NAMESPACE_CLASSES = {
    "keras.initializers": frozenset(
        {
            "Constant",
            "GlorotNormal",
            "GlorotUniform",
            "HeNormal",
            "HeUniform",
            "Identity",
            "IdentityInitializer",
            "Initializer",
            "LecunNormal",
            "LecunUniform",
            "Ones",
            "Orthogonal",
            "OrthogonalInitializer",
            "RandomNormal",
            "RandomUniform",
            "STFT",
            "STFTInitializer",
            "TruncatedNormal",
            "VarianceScaling",
            "Zeros",
            "constant",
            "glorot_normal",
            "glorot_uniform",
            "he_normal",
            "he_uniform",
            "identity",
            "lecun_normal",
            "lecun_uniform",
            "ones",
            "orthogonal",
            "random_normal",
            "random_uniform",
            "stft",
            "truncated_normal",
            "variance_scaling",
            "zeros",
        }
    ),
    "keras.regularizers": frozenset(
        {"L1", "L1L2", "L2", "OrthogonalRegularizer", "Regularizer", "l1", "l1_l2", "l2", "orthogonal_regularizer"}
    ),
    "keras.constraints": frozenset(
        {
            "Constraint",
            "MaxNorm",
            "MinMaxNorm",
            "NonNeg",
            "UnitNorm",
            "max_norm",
            "min_max_norm",
            "non_neg",
            "unit_norm",
        }
    ),
}


def _refusal(obj: dict[str, Any]) -> str | None:
    """Why one serialized object is refused, or None when it is a built-in Keras class."""
    class_name = obj.get("class_name")
    module = obj.get("module")
    registered = obj.get("registered_name")
    if not isinstance(class_name, str):
        return f"class_name must be a string naming a Keras class, not {type(class_name).__name__}"
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
        return None if class_name in BUILTIN_LAYERS else "unknown layer class, not in keras.layers"
    if class_name in MODEL_CLASSES and (module in ("keras", "keras.models") or module.startswith("keras.src.")):
        return None
    if module == "keras" and class_name in DTYPE_POLICIES:
        return None
    if module in NAMESPACE_CLASSES:
        return None if class_name in NAMESPACE_CLASSES[module] else f"unknown class in {module}"
    return f"not an allowed Keras class (module={module!r})"


def _problem(layer: str, class_name: Any, reason: str) -> Problem:
    shown = class_name if isinstance(class_name, str) else repr(class_name)[:60]
    return Problem(
        "keras_json_refused",
        f"{FIELD}: layer {layer!r} ({shown}): {reason}. Only built-in Keras layers are accepted. "
        f"Received: class_name={class_name!r}"[:600],
        FIELD,
    )


def _walk(root: Any, problems: list[Problem]) -> None:
    """Check every serialized object under ``root`` (a stack, not recursion); name the layer holding each."""
    stack: list[tuple[Any, str]] = [(root, "(model)")]
    while stack:
        node, layer = stack.pop()
        if isinstance(node, list):
            stack.extend((item, layer) for item in reversed(node))
            continue
        if not isinstance(node, dict):
            continue
        if "class_name" in node:
            config = node.get("config")
            if isinstance(config, dict) and isinstance(config.get("name"), str):
                layer = config["name"]
            reason = _refusal(node)
            if reason:
                problems.append(_problem(layer, node.get("class_name"), reason))
                continue  # what a refused object holds (a Lambda's code) is refused with it
        stack.extend((value, layer) for value in reversed(list(node.values())))


def _structure_problems(config: Any) -> list[Problem]:
    """Why ``config`` is not shaped like a serialized Sequential or Functional model."""

    def invalid(detail: str) -> list[Problem]:
        return [Problem("keras_json_invalid", f"{FIELD}: {detail}"[:600], FIELD)]

    if not isinstance(config, dict):
        return invalid(f"expected a serialized model object. Received: {type(config).__name__}")
    class_name = config.get("class_name")
    if not isinstance(class_name, str) or class_name not in MODEL_CLASSES:
        return invalid(f"expected a Sequential or Functional model. Received: class_name={class_name!r}")
    inner = config.get("config")
    if not isinstance(inner, dict):
        return invalid(f"expected the model's 'config' to be an object. Received: {type(inner).__name__}")
    layers = inner.get("layers")
    if not isinstance(layers, list) or not layers:
        return invalid("expected 'config.layers' to be a non-empty list of layer objects")
    for index, layer in enumerate(layers):
        if not isinstance(layer, dict) or not isinstance(layer.get("config"), dict):
            return invalid(f"expected config.layers[{index}] to be an object with a 'config' object")
        if not isinstance(layer.get("class_name"), str):
            return invalid(
                f"expected config.layers[{index}].class_name to be a string. Received: {layer.get('class_name')!r}"
            )
    if class_name == "Functional":
        for key in ("input_layers", "output_layers"):
            if not isinstance(inner.get(key), list) or not inner[key]:
                return invalid(f"a Functional model needs 'config.{key}', a non-empty list")
    return []


def config_problems(config: Any) -> list[Problem]:
    """Every reason a ``model.to_json()`` config is refused: its shape, then each non-built-in object.

    Args:
        config: the parsed ``model.to_json()`` output.

    Returns:
        Problems (``keras_json_invalid``, ``keras_json_refused`` naming the layer); empty when the config
        is a Sequential or Functional model of built-in Keras classes.
    """
    problems: list[Problem] = []
    _walk(config, problems)
    return problems or _structure_problems(config)

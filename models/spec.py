"""The job spec: what to build and how to train it, as pydantic models with a published JSON Schema.

Importing this module never imports Keras: the service validates specs in a process that must stay
free of any framework. Checks that need the data set (input shape, number of classes) and the safe-mode
walk of a ``keras_json`` model happen in :func:`models.fit.spec_data_problems` (also Keras-free, run by
the API at submit and by :func:`models.build.build_model`).

Shape::

    {"name": ..., "architecture": {"family": "mlp|highway|resnet|snn|cnn|keras_json", ...},
     "output": {"activation", "units"}, "loss": ..., "metrics": [...],
     "training": {...}, "data": {...DataKeys...}, "resources": {...}}
"""

from __future__ import annotations

import copy
import json
import math
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from core.errors import Problem, SpecError
from core.jsondepth import MAX_JSON_DEPTH, text_depth, value_depth
from core.names import EXPORT_ARTIFACTS, EXPORT_FORMATS
from models.data.summary import DataKeys
from models.health import HEALTH_KINDS
from models.vocabulary import (
    LOSS_ALIASES,
    LOSSES,
    METRIC_ALIASES,
    METRICS,
)

FAMILIES = ("mlp", "highway", "resnet", "snn", "cnn", "keras_json")
ACTIVATIONS = ("relu", "leaky_relu", "elu", "selu", "tanh", "sigmoid", "linear")

Activation = Literal["relu", "leaky_relu", "elu", "selu", "tanh", "sigmoid", "linear"]
KernelInitializer = Literal["glorot_uniform", "glorot_normal", "he_normal", "he_uniform", "lecun_normal"]
InputNormalization = Literal["none", "standardize", "rescale"]
OutputActivation = Literal["softmax", "sigmoid", "linear", "relu", "softplus", "tanh"]
# Numbers are strict: "12" is not 12 and true is not 1 (a string or a bool where a number belongs is a
# mistake to report, not to guess at); an int is still a float. NaN and ±Infinity are refused by the
# models' allow_inf_nan=False.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
Rate = Annotated[float, Strict(), Field(ge=0.0, lt=1.0)]

_GPU_PATTERN = r"^(any|cpu|GPU-[0-9a-fA-F-]{36}|MIG-[0-9a-fA-F-]{36}|MIG-GPU-[0-9a-fA-F-]{36}/[0-9]+/[0-9]+)$"


def _conflict(field: str, message: str, value: Any, **context: Any) -> PydanticCustomError:
    """A cross-field error that :func:`parse_spec` reports under ``<model path>.<field>``."""
    return PydanticCustomError("conflict", message, {"field": field, "value": value, **context})


class _Strict(BaseModel):
    """Base of every spec model: unknown keys are errors, so a typo never passes silently; NaN and ±Infinity
    are refused for every number (a NaN learning rate trains nothing, and JSON cannot show it back)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# --------------------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------------------


class _ArchitectureBase(_Strict):
    input_shape: list[PositiveInt] | None = Field(
        None,
        description="Per-sample input shape, for a dry run without a data set. When a data set is "
        "given, it must equal the data's X_train shape without the row axis.",
    )
    input_normalization: InputNormalization = Field(
        "none",
        description="Preprocessing stored in the model: 'standardize' (a Normalization layer holding the "
        "training data's per-feature mean and variance), 'rescale' (multiply by input_scale), or 'none'.",
    )
    input_scale: Float | None = Field(
        None, gt=0, description="Factor of input_normalization='rescale', e.g. 0.0625 for digits (0..16)."
    )
    leaky_relu_slope: Float = Field(
        0.2, ge=0.0, lt=1.0, description="Negative slope, used only with activation 'leaky_relu'."
    )

    @model_validator(mode="after")
    def _rescale_needs_scale(self) -> _ArchitectureBase:
        if self.input_normalization == "rescale" and self.input_scale is None:
            raise _conflict(
                "input_scale",
                "input_normalization='rescale' needs input_scale, a positive factor",
                None,
            )
        if self.input_normalization != "rescale" and self.input_scale is not None:
            raise _conflict(
                "input_scale",
                "input_scale is only used with input_normalization='rescale', not '{normalization}'",
                self.input_scale,
                normalization=self.input_normalization,
            )
        return self


class MlpArchitecture(_ArchitectureBase):
    """A stack of Dense blocks: Dense → [BatchNormalization] → activation → [Dropout]."""

    family: Literal["mlp"]
    widths: list[PositiveInt] = Field(min_length=1, description="Units of each hidden Dense layer.")
    activation: Activation = "relu"
    kernel_initializer: KernelInitializer = Field(
        "glorot_uniform", description="glorot_uniform is Xavier's initialisation."
    )
    batch_norm: Bool = False
    dropout: Rate = 0.0


class HighwayArchitecture(_ArchitectureBase):
    """Highway blocks ``y = x + T·(H − x)``, T a sigmoid gate whose bias starts at ``transform_bias``."""

    family: Literal["highway"]
    depth: PositiveInt = Field(description="Number of highway blocks.")
    width: PositiveInt = Field(description="Units of every block; the input is projected when it differs.")
    activation: Activation = Field("relu", description="Activation of H.")
    transform_bias: Float = Field(
        -2.0, description="Initial bias of the gate T; negative so a fresh block carries its input."
    )
    kernel_initializer: KernelInitializer = "glorot_uniform"
    dropout: Rate = 0.0


class ResnetDenseArchitecture(_ArchitectureBase):
    """Residual blocks of two Dense layers for vector inputs."""

    family: Literal["resnet"]
    variant: Literal["dense"]
    width: PositiveInt
    blocks: PositiveInt
    activation: Activation = "relu"
    batch_norm: Bool = True
    kernel_initializer: KernelInitializer = "he_normal"
    dropout: Rate = 0.0


class ResnetConvArchitecture(_ArchitectureBase):
    """A convolutional ResNet: stem, stages of basic or bottleneck blocks, global average pooling."""

    family: Literal["resnet"]
    variant: Literal["conv"]
    stages: list[PositiveInt] = Field(min_length=1, description="Number of blocks in each stage.")
    filters: list[PositiveInt] = Field(
        min_length=1,
        description="Filters of each stage (a bottleneck block outputs 4× as many), one per stage.",
    )
    block: Literal["basic", "bottleneck"] = Field(
        "basic", description="basic: 3×3, 3×3. bottleneck: 1×1, 3×3, 1×1·4 (keras.applications)."
    )
    kernel_size: PositiveInt = 3
    stem_filters: PositiveInt | None = Field(None, description="Filters of the stem conv; default filters[0].")
    activation: Activation = "relu"
    batch_norm: Bool = True
    kernel_initializer: KernelInitializer = "he_normal"

    @model_validator(mode="after")
    def _one_filter_count_per_stage(self) -> ResnetConvArchitecture:
        if len(self.filters) != len(self.stages):
            raise _conflict(
                "filters",
                "needs one filter count per stage, {stages} stage(s) in stages={stage_list}",
                self.filters,
                stages=len(self.stages),
                stage_list=self.stages,
            )
        return self


ResnetArchitecture = Annotated[ResnetDenseArchitecture | ResnetConvArchitecture, Field(discriminator="variant")]


class SnnArchitecture(_ArchitectureBase):
    """A self-normalizing network (selu, lecun_normal, AlphaDropout) on standardized inputs.

    BatchNormalization, plain Dropout, another activation or initialiser are allowed but break the
    self-normalizing property; the dry run warns about each.
    """

    family: Literal["snn"]
    widths: list[PositiveInt] = Field(min_length=1)
    activation: Activation = "selu"
    kernel_initializer: KernelInitializer = "lecun_normal"
    alpha_dropout: Rate = 0.05
    batch_norm: Bool = False
    dropout: Rate = 0.0
    input_normalization: Literal["standardize"] = Field(
        "standardize",
        description="Always 'standardize': SELU's fixed point assumes zero-mean unit-variance inputs.",
    )


class CnnArchitecture(_ArchitectureBase):
    """The course's mnist_cnn: Conv2D ×n, MaxPooling2D, Dropout, Flatten, Dense, Dropout."""

    family: Literal["cnn"]
    filters: list[PositiveInt] = Field([32, 64], min_length=1, description="Filters of each Conv2D.")
    kernel_size: PositiveInt = 3
    padding: Literal["valid", "same"] = "valid"
    pool_size: PositiveInt = 2
    dropout: Rate = 0.25
    dense_units: PositiveInt = 128
    dense_dropout: Rate = 0.5
    activation: Activation = "relu"
    kernel_initializer: KernelInitializer = "glorot_uniform"


class KerasJsonArchitecture(_ArchitectureBase):
    """A model given as the output of ``model.to_json()``, deserialized in safe mode from built-in layers."""

    family: Literal["keras_json"]
    model_json: str | dict[str, Any] = Field(
        description="The string or object that model.to_json() returns. Lambda layers, custom and "
        "unknown classes are refused."
    )
    input_normalization: Literal["none"] = Field("none", description="Only 'none': the JSON model is used as is.")

    @field_validator("model_json")
    @classmethod
    def _json_object(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        config = value
        depth = text_depth(value) if isinstance(value, str) else value_depth(value, MAX_JSON_DEPTH)
        if depth > MAX_JSON_DEPTH:  # before json.loads or any walk: both recurse
            raise PydanticCustomError(
                "keras_json_too_deep",
                "Expected a model config nested at most {limit} levels deep; this one nests {depth}",
                {"limit": MAX_JSON_DEPTH, "depth": depth, "value": f"a config {depth} levels deep"},
            )
        if isinstance(value, str):
            try:
                config = json.loads(value)
            except json.JSONDecodeError as exc:
                raise PydanticCustomError(
                    "json_invalid",
                    "Expected the JSON text of model.to_json(); it does not parse: {error}",
                    {"error": str(exc)},
                ) from exc
        if not isinstance(config, dict) or "class_name" not in config or "config" not in config:
            raise PydanticCustomError(
                "keras_json_invalid",
                "Expected a serialized Keras model, an object with 'class_name' and 'config'",
            )
        return value

    def config(self) -> dict[str, Any]:
        """The model's config as a fresh object, whichever form the spec used (Keras's deserializer pops
        keys from the config it is given: the spec's own must stay whole for the size walk after it)."""
        if isinstance(self.model_json, str):
            config: dict[str, Any] = json.loads(self.model_json)
            return config
        return copy.deepcopy(self.model_json)


Architecture = Annotated[
    MlpArchitecture
    | HighwayArchitecture
    | ResnetArchitecture
    | SnnArchitecture
    | CnnArchitecture
    | KerasJsonArchitecture,
    Field(discriminator="family"),
]


# --------------------------------------------------------------------------------------------------------
# Output, training, resources
# --------------------------------------------------------------------------------------------------------


class OutputSpec(_Strict):
    """The output layer; each field left out follows the data set (see models/heads.py)."""

    activation: OutputActivation | None = None
    units: PositiveInt | None = None
    export: list[Literal[EXPORT_FORMATS]] = Field(  # type: ignore[valid-type]  # a Literal of a constant tuple: pydantic reads it
        default_factory=list,
        description="Formats the trainer exports the finished model to, besides model.h5 and model.keras: "
        f"any of {', '.join(EXPORT_FORMATS)} (artifacts {', '.join(EXPORT_ARTIFACTS.values())}). Or later: "
        "POST /v1/jobs/<id>/export (gpuyard export).",
    )

    @field_validator("export")
    @classmethod
    def _export_once_each(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class SgdOptimizer(_Strict):
    name: Literal["sgd"]
    learning_rate: Float = Field(0.01, gt=0)
    momentum: Float = Field(0.0, ge=0.0, lt=1.0)
    nesterov: Bool = False


class AdamOptimizer(_Strict):
    name: Literal["adam"]
    learning_rate: Float = Field(0.001, gt=0)


class RmspropOptimizer(_Strict):
    name: Literal["rmsprop"]
    learning_rate: Float = Field(0.001, gt=0)


Optimizer = Annotated[SgdOptimizer | AdamOptimizer | RmspropOptimizer, Field(discriminator="name")]
OPTIMIZERS = ("sgd", "adam", "rmsprop")


class EarlyStoppingSpec(_Strict):
    monitor: str = Field("val_loss", min_length=1)
    patience: Int = Field(5, ge=0)
    min_delta: Float = Field(0.0, ge=0.0)
    restore_best_weights: Bool = True


class TrainingSpec(_Strict):
    epochs: PositiveInt = Field(10, le=100_000)
    batch_size: PositiveInt = Field(32, le=1 << 16)
    optimizer: Optimizer = Field(default_factory=lambda: AdamOptimizer(name="adam"))
    validation_split: Float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Fraction of the training rows held out, used only when the file has no X_val/Y_val "
        "(the file's validation set wins).",
    )
    seed: Int = Field(0, ge=0, le=2**32 - 1, description="Seeds weights, shuffling and the split.")
    early_stopping: EarlyStoppingSpec | None = None
    shuffle: Bool = True
    stop_on: list[Literal[HEALTH_KINDS]] = Field(  # type: ignore[valid-type]  # a Literal of a constant tuple: pydantic reads it
        default_factory=list,
        description="Health findings that end the job as failed (reason 'unhealthy') when the trainer sees "
        f"them, at epoch 0 or after any epoch; any of {', '.join(HEALTH_KINDS)}. Default: none, the findings "
        "are only reported.",
    )


#: What an unsized 'auto' stands for: where there is no estimate to size it from (keras_json, no GPU
#: registered), and for a stored spec that was never sized.
UNSIZED_FRACTION = 0.25
AUTO: Final = "auto"


class ResourcesSpec(_Strict):
    """Validated when the job is submitted, enforced by the worker."""

    memory_fraction: Float | Literal["auto"] = Field(
        AUTO,
        description="Share of the GPU's memory the job may use: 0.25 lets four jobs share a GPU, 1.0 has a GPU "
        "alone. 'auto' (the default): gpuyard sizes it at submit from the model's estimated training memory, "
        "corrected by the peaks measured on earlier jobs of the same family (see README); a job that still "
        "runs out is requeued once at its measured peak.",
    )
    backend: Literal["tensorflow", "jax", "torch"] = "tensorflow"
    max_runtime_s: PositiveInt | None = Field(None, description="Wall-clock limit; the job stops after it.")
    preemptible: Bool = Field(
        True,
        description="Whether a waiting job of higher priority may stop this one (it checkpoints and returns to "
        "the queue, losing no attempt). false needs an admin's `gpuyard users set-priority NAME N --may-pin`.",
    )

    @field_validator("memory_fraction", mode="before")
    @classmethod
    def _number_or_auto(cls, value: Any) -> Any:
        if value == AUTO or (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)):
            return value
        raise PydanticCustomError("number_or_auto", "Expected a finite number in (0, 1] or 'auto'")

    @field_validator("memory_fraction")
    @classmethod
    def _fraction_range(cls, value: float | str) -> float | str:
        if value != AUTO and not 0.0 < float(value) <= 1.0:
            raise ValueError(f"Expected a number in (0, 1] or 'auto'. Received: memory_fraction={value!r}")
        return value

    @property
    def fraction(self) -> float:
        """The memory fraction as a number (an unresolved 'auto' counts as :data:`UNSIZED_FRACTION`)."""
        return UNSIZED_FRACTION if self.memory_fraction == AUTO else float(self.memory_fraction)

    gpu: str = Field(
        "any",
        pattern=_GPU_PATTERN,
        description="'any', 'cpu', or a GPU UUID (GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx) or MIG UUID.",
    )


class JobSpec(_Strict):
    """One training job."""

    name: str | None = Field(None, min_length=1, max_length=200)
    architecture: Architecture
    output: OutputSpec = Field(default_factory=OutputSpec)
    loss: str | None = Field(
        None, description=f"A Keras loss by name; aliases are stored in full. One of: {', '.join(LOSSES)}."
    )
    metrics: list[str] | None = Field(
        None, description="Keras metrics by name; default: accuracy (classification) or mean_absolute_error."
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    data: DataKeys = Field(default_factory=DataKeys)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    @field_validator("loss")
    @classmethod
    def _full_loss_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        name = LOSS_ALIASES.get(value, value)
        if name not in LOSSES:
            raise PydanticCustomError(
                "loss_unknown",
                "Expected a Keras loss name, one of {expected} (or an alias: {aliases})",
                {"expected": ", ".join(LOSSES), "aliases": ", ".join(LOSS_ALIASES)},
            )
        return name

    @field_validator("metrics")
    @classmethod
    def _full_metric_names(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        names = [METRIC_ALIASES.get(m, m) for m in value]
        unknown = [m for m, n in zip(value, names, strict=True) if n not in METRICS]
        if unknown:
            raise PydanticCustomError(
                "metric_unknown",
                "Unknown metric(s) {unknown}; expected names from {expected}",
                {"unknown": unknown, "expected": ", ".join(METRICS)},
            )
        if len(set(names)) != len(names):
            raise PydanticCustomError("metric_repeated", "A metric is listed twice (after aliases)")
        return names


# --------------------------------------------------------------------------------------------------------
# Parsing and the schema
# --------------------------------------------------------------------------------------------------------


def _field_path(loc: tuple[int | str, ...], ctx: dict[str, Any] | None) -> str:
    """Dotted spec path of an error location, without pydantic's union tags (``architecture.mlp.x``)."""
    parts = list(loc)
    if parts[:1] == ["architecture"] and len(parts) > 1 and parts[1] in FAMILIES:
        family = parts.pop(1)
        if family == "resnet" and len(parts) > 1 and parts[1] in ("dense", "conv"):
            parts.pop(1)
    if parts[:2] == ["training", "optimizer"] and len(parts) > 2 and parts[2] in OPTIMIZERS:
        parts.pop(2)
    if ctx and "field" in ctx:
        parts.append(ctx["field"])
    return ".".join(str(p) for p in parts) or "(spec)"


def _short_repr(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_TAGS = {"family": FAMILIES, "variant": ("dense", "conv"), "name": OPTIMIZERS}


def _received(field: str, value: Any) -> str:
    """``widths[1]=-1`` for ``architecture.widths.1``, ``epochs=0`` for ``training.epochs``."""
    parts = field.split(".")
    name = parts[-1]
    if name.isdigit() and len(parts) > 1:
        name = f"{parts[-2]}[{name}]"
    return f"{name}={_short_repr(value)}"


def _problem(error: ErrorDetails) -> Problem:
    ctx = error.get("ctx") or {}
    field = _field_path(tuple(error["loc"]), ctx)
    message = error["msg"].removeprefix("Value error, ")
    value = ctx.get("value", error.get("input"))
    if error["type"] in ("union_tag_not_found", "union_tag_invalid"):
        # Name the tag itself ("architecture.family"), not the object that lacks it.
        tag = ctx.get("discriminator", "").strip("'")
        field = f"{field}.{tag}"
        message = f"Expected one of {', '.join(_TAGS.get(tag, ()))}"
        value = ctx.get("tag")
        received = "nothing" if error["type"] == "union_tag_not_found" else _received(field, value)
    elif error["type"] == "missing":
        received = "nothing"
    else:
        received = _received(field, value)
    return Problem(error["type"], f"{field}: {message}. Received: {received}", field)


def parse_spec(obj: dict[str, Any]) -> JobSpec:
    """Validate a job spec, reporting every problem at once.

    Args:
        obj: the spec as decoded JSON.

    Returns:
        The validated spec, with loss and metric aliases replaced by full Keras names.

    Raises:
        SpecError: listing every problem, each naming the field (dotted path), the value received and
            what was expected.
    """
    if not isinstance(obj, dict):
        raise SpecError(
            [Problem("type_error", f"Expected the job spec as a JSON object. Received: {_short_repr(obj)}")]
        )
    try:
        return JobSpec.model_validate(obj)
    except ValidationError as exc:
        raise SpecError([_problem(e) for e in exc.errors(include_url=False)]) from exc


def resources_of(spec: dict[str, Any] | None) -> ResourcesSpec:
    """The typed resources of a stored (already validated) spec, with the spec's defaults filled in.

    Every reader of a job's resources (dispatcher, supervisor, GPU views) goes through here, so a default
    such as ``memory_fraction`` lives only in :class:`ResourcesSpec`.
    """
    raw = (spec or {}).get("resources")
    return ResourcesSpec.model_validate(raw if isinstance(raw, dict) else {})


def job_spec_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a job spec, as published by the API.

    Returns:
        The schema as a JSON-compatible dict.
    """
    schema = JobSpec.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://gpuyard.invalid/schemas/job-spec.json",
        **schema,
    }

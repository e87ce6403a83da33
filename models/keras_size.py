"""The size of a keras_json model from its config alone: every layer call walked, every weight counted.

No Keras import: the API sizes the model at submit, the dry run reports the same numbers
(``models.size.model_size`` calls :func:`keras_json_size` for keras_json specs). A Sequential model is
walked in order, a Functional one through its ``inbound_nodes`` graph (in dependency order, a queue, no
recursion on the graph; a shared layer's weights count once, its outputs once per call). Nested models,
``Bidirectional`` and ``TimeDistributed`` are sized through the layer they hold. The per-layer rules are
``models.keras_layers``; a layer class or option they cannot size refuses the model, naming the layer and
why, so nothing is guessed.

Like the trainer (``models.blocks.keras_json``), a model must have one input and one output; the input is
sized at the data's sample shape.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from core.errors import Problem, SpecError
from models.keras_config import FIELD, MODEL_CLASSES
from models.keras_layers import RULES, Counted, Shape, Uncountable

NestedLimit = 64  # models inside models: enough for any real model, bounded for a crafted one


@dataclass
class KerasJsonSize:
    """What walking a keras_json model found.

    Args:
        parameters: every weight (trainable and not), each layer counted once.
        trainable: trainable weights.
        activations_per_sample: floats every layer call outputs for one sample, plus what attention and
            recurrent layers keep besides their output (scores, gates per step).
        declared_input: the sample shape the model's input declares (None where it declares none).
        output_shape: the model's output sample shape at the data's input shape.
    """

    parameters: int = 0
    trainable: int = 0
    activations_per_sample: int = 0
    declared_input: list[int | None] | None = None
    output_shape: Shape = ()
    _counted: set[int] = field(default_factory=set, repr=False)


def _refused(layer: str, class_name: Any, reason: str) -> SpecError:
    return SpecError(
        [
            Problem(
                "keras_json_refused",
                f"{FIELD}: layer {layer!r} ({class_name}): gpuyard cannot size it at submit: {reason}. "
                f"Received: class_name={class_name!r}"[:600],
                FIELD,
            )
        ]
    )


def _invalid(detail: str) -> SpecError:
    return SpecError([Problem("keras_json_invalid", f"{FIELD}: {detail}"[:600], FIELD)])


def _config(layer: dict[str, Any]) -> dict[str, Any]:
    config = layer.get("config")
    return config if isinstance(config, dict) else {}


def _name(layer: dict[str, Any]) -> str:
    config = _config(layer)
    name = layer.get("name", config.get("name"))
    return name if isinstance(name, str) else "?"


def _call(layer: dict[str, Any], inputs: list[Shape], size: KerasJsonSize, depth: int) -> Shape:
    """Size one call of ``layer`` on ``inputs``; add its weights (first call only) and outputs to ``size``."""
    class_name = layer.get("class_name")
    config = _config(layer)
    try:
        counted = _count(class_name, config, inputs, depth)
    except Uncountable as exc:
        raise _refused(_name(layer), class_name, str(exc)) from exc
    if id(layer) not in size._counted:
        size._counted.add(id(layer))
        size.parameters += counted.parameters
        size.trainable += counted.trainable
    size.activations_per_sample += math.prod(counted.output) + counted.hidden
    return counted.output


def _count(class_name: Any, config: dict[str, Any], inputs: list[Shape], depth: int) -> Counted:
    if class_name in MODEL_CLASSES:
        if depth >= NestedLimit:
            raise Uncountable(f"models nested more than {NestedLimit} deep")
        if len(inputs) != 1:
            raise Uncountable("a nested model must take one input")
        inner = _walk({"class_name": class_name, "config": config}, inputs[0], depth + 1)
        # Its outputs were counted layer by layer; the call's own output is the last of them.
        trainable = 0 if config.get("trainable") is False else inner.trainable
        return Counted(
            inner.output_shape,
            inner.parameters,
            trainable,
            inner.activations_per_sample - math.prod(inner.output_shape),
        )
    inner_layer = config.get("layer")
    if class_name in ("Bidirectional", "TimeDistributed"):
        if not isinstance(inner_layer, dict) or not isinstance(inner_layer.get("config"), dict):
            raise Uncountable("expected the wrapped layer as an object under config.layer")
        wrapped = inner_layer["class_name"]
        if class_name == "TimeDistributed":
            shape = inputs[0] if len(inputs) == 1 else ()
            if len(shape) < 2:
                raise Uncountable("expected one input of rank 3 or more")
            part = _count(wrapped, inner_layer["config"], [shape[1:]], depth + 1)
            steps = shape[0]
            trainable = 0 if config.get("trainable") is False else part.trainable
            return Counted((steps, *part.output), part.parameters, trainable, steps * part.hidden)
        merge = config.get("merge_mode", "concat")
        if merge not in ("concat", "sum", "mul", "ave"):
            raise Uncountable(f"merge_mode {merge!r} (several outputs) is not sized")
        part = _count(wrapped, inner_layer["config"], inputs, depth + 1)
        backward_layer = config.get("backward_layer")
        backward = part
        if isinstance(backward_layer, dict) and isinstance(backward_layer.get("config"), dict):
            backward = _count(backward_layer.get("class_name"), backward_layer["config"], inputs, depth + 1)
        if backward.output != part.output:
            raise Uncountable("the backward layer's output differs from the forward layer's")
        out = (*part.output[:-1], 2 * part.output[-1]) if merge == "concat" else part.output
        parameters, trainable = part.parameters + backward.parameters, part.trainable + backward.trainable
        trainable = 0 if config.get("trainable") is False else trainable
        return Counted(out, parameters, trainable, part.hidden + backward.hidden + 2 * math.prod(part.output))
    rule = RULES.get(class_name) if isinstance(class_name, str) else None
    if rule is None:
        raise Uncountable("gpuyard has no size rule for this layer class; build the model from sizeable layers")
    return rule(config, inputs)


def _declared_input(config: dict[str, Any]) -> list[int | None] | None:
    shape = config.get("batch_shape", config.get("batch_input_shape"))
    if isinstance(shape, list) and shape and all(d is None or (isinstance(d, int) and d > 0) for d in shape):
        return list(shape[1:])
    return None


def _walk(model: dict[str, Any], input_shape: Shape, depth: int = 0) -> KerasJsonSize:
    inner = model.get("config")
    layers = inner.get("layers") if isinstance(inner, dict) else None
    if not isinstance(inner, dict) or not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        raise _invalid("expected a model whose config.layers is a list of layer objects")
    if model.get("class_name") == "Sequential":
        return _sequential(inner, layers, input_shape, depth)
    return _functional(inner, layers, input_shape, depth)


def _sequential(inner: dict[str, Any], layers: list[dict[str, Any]], shape: Shape, depth: int) -> KerasJsonSize:
    size = KerasJsonSize()
    if layers and layers[0].get("class_name") == "InputLayer":
        size.declared_input = _declared_input(layers[0].get("config") or {})
        layers = layers[1:]
    elif isinstance(inner.get("build_input_shape"), list):
        size.declared_input = _declared_input({"batch_shape": inner["build_input_shape"]})
    for layer in layers:
        shape = _call(layer, [shape], size, depth)
    size.output_shape = shape
    return size


def _tensor_refs(value: Any) -> list[tuple[str, int, int]]:
    """The ``(layer, node, tensor)`` references a node's args hold, in order (Keras 3 and legacy forms)."""
    refs: list[tuple[str, int, int]] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("class_name") == "__keras_tensor__":
                history = (item.get("config") or {}).get("keras_history")
                if not (isinstance(history, list) and len(history) == 3 and isinstance(history[0], str)):
                    raise _invalid(f"a __keras_tensor__ without a valid keras_history: {history!r}")
                refs.append((history[0], history[1], history[2]))
            else:
                stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            if len(item) in (3, 4) and isinstance(item[0], str) and isinstance(item[1], int):
                refs.append((item[0], item[1], item[2]))  # legacy [layer, node, tensor, kwargs]
            else:
                stack.extend(reversed(item))
    return refs


def _io_refs(value: Any, key: str) -> list[tuple[str, int, int]]:
    if isinstance(value, list) and len(value) == 3 and isinstance(value[0], str):
        value = [value]  # a single input or output is written as one triple
    refs = _tensor_refs(value) if isinstance(value, list) else []
    if len(refs) != 1:
        raise _invalid(f"expected one input and one output; config.{key} names {len(refs)}")
    return refs


def _functional(inner: dict[str, Any], layers: list[dict[str, Any]], shape: Shape, depth: int) -> KerasJsonSize:
    size = KerasJsonSize()
    by_name = {_name(layer): layer for layer in layers}
    ((input_name, _, _),) = _io_refs(inner.get("input_layers"), "input_layers")
    ((output_name, output_node, output_tensor),) = _io_refs(inner.get("output_layers"), "output_layers")
    outputs: dict[tuple[str, int], Shape] = {}
    waiting: dict[tuple[str, int], list[tuple[str, int]]] = {}  # a node's output -> the nodes waiting for it
    missing: dict[tuple[str, int], int] = {}
    nodes: dict[tuple[str, int], list[tuple[str, int, int]]] = {}
    for layer in layers:
        name = _name(layer)
        if layer.get("class_name") == "InputLayer":
            if name != input_name:
                raise _invalid(f"expected one input; InputLayer {name!r} is not config.input_layers")
            size.declared_input = _declared_input(layer.get("config") or {})
            outputs[(name, 0)] = shape
            continue
        offset = 1 if layer.get("class_name") == "Functional" else 0  # Keras: a Functional's node 0 is built in
        for index, node in enumerate(layer.get("inbound_nodes") or []):
            key = (name, index + offset)
            refs = _tensor_refs(node.get("args") if isinstance(node, dict) else node)
            refs += _tensor_refs(node.get("kwargs")) if isinstance(node, dict) else []
            for ref in refs:
                if ref[0] not in by_name:
                    raise _invalid(f"layer {name!r} is called on {ref[0]!r}, which is not a layer of the model")
                if ref[2] != 0:
                    raise _refused(
                        ref[0], by_name[ref[0]].get("class_name"), "layers with several outputs are not sized"
                    )
            nodes[key] = refs
            before = [(name, index + offset - 1)] if index else []
            pending = {(r[0], r[1]) for r in refs} | set(before)
            missing[key] = len(pending)
            for dependency in pending:
                waiting.setdefault(dependency, []).append(key)
    ready = deque(key for key, count in missing.items() if count == 0)
    for known in outputs:
        ready.extend(_release(known, waiting, missing))
    while ready:
        key = ready.popleft()
        outputs[key] = _call(by_name[key[0]], [outputs[(r[0], r[1])] for r in nodes[key]], size, depth)
        ready.extend(_release(key, waiting, missing))
    if len(outputs) - 1 != len(nodes):
        unresolved = sorted(n for n, _ in set(nodes) - set(outputs))[:5]
        raise _invalid(f"the layer graph has a loop or a call of a missing node (layers {unresolved})")
    final = outputs.get((output_name, output_node))
    if final is None or output_tensor != 0:
        raise _invalid(f"config.output_layers names {output_name!r} node {output_node}, which the graph never makes")
    size.output_shape = final
    return size


def _release(
    done: tuple[str, int], waiting: dict[tuple[str, int], list[tuple[str, int]]], missing: dict[tuple[str, int], int]
) -> list[tuple[str, int]]:
    freed = []
    for key in waiting.pop(done, []):
        missing[key] -= 1
        if missing[key] == 0:
            freed.append(key)
    return freed


def keras_json_size(config: dict[str, Any], input_shape: list[int]) -> KerasJsonSize:
    """Size a ``model.to_json()`` config (already through ``config_problems``) at the data's sample shape.

    Args:
        config: the parsed model config.
        input_shape: the data's per-sample input shape.

    Returns:
        Its weights, activations per sample, declared input and output shape.

    Raises:
        SpecError: ``keras_json_refused`` naming a layer it cannot size and why, or ``keras_json_invalid``
            for a model that is not one input to one output or whose graph does not resolve.
    """
    if not isinstance(config, dict) or config.get("class_name") not in MODEL_CLASSES:
        raise _invalid("expected a Sequential or Functional model")
    try:
        return _walk(config, tuple(input_shape))
    except (TypeError, ValueError, IndexError, KeyError, AttributeError, ZeroDivisionError) as exc:
        # A config of the right classes but malformed values (a list where a number belongs, ...).
        raise _invalid(f"the model config cannot be read: {type(exc).__name__}: {str(exc)[:200]}") from exc

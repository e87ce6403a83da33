"""Training health: rules that read one diagnostics record and say what is wrong and what the course does.

Pure Python (no Keras, no numpy): the trainer calls :func:`health_events` on each epoch's diagnostics
record (``worker/trainer/diagnostics.py``), the dry run calls :func:`predict_health` on a spec, and the
service and CLI only read the findings. A finding is a JSON-ready dict::

    {"kind": "vanishing_gradient", "epoch": 0, "value": 3e-11, "threshold": 0.001,
     "blocks": ["dense1", ...], "detail": "<the numbers, in words>", "remedy": "<one sentence>"}

The rules, each tuned so that a healthy network raises nothing (false alarms are worse than silence):

- ``vanishing_gradient`` / ``exploding_gradient``: the gradient norm of the first hidden block with
  weights over that of the last hidden block (the output layer left out) is below
  ``vanishing_ratio`` / above ``exploding_ratio``; a non-finite gradient norm anywhere is exploding too.
- ``dead_units``: a block's share of ReLU units never active on the whole probe batch is above
  ``dead_units_share``.
- ``snn_drift`` (SNN family only): at epoch 0 a block's activation mean is outside 0 ± ``snn_mean_tolerance``
  or its variance outside 1 ± ``snn_variance_tolerance``, bands widened for narrow blocks by a finite layer's
  own noise (see :func:`_snn_tolerances`: 32 units, ±0.18 and ±0.5; 64 units, ±0.125 and ±0.35). Once
  training has started the statistics
  legitimately move (a 32-block SNN on digits: variance 0.85-1.02 at epoch 0, 1.1-5.3 after two SGD
  epochs), so then only a breakdown counts: a variance below ``snn_variance_floor`` (the units collapsed to
  a constant) or above ``snn_variance_ceiling`` (the activations blow up), or a non-finite statistic.
- ``loss_not_finite``: the probe batch's loss, or the epoch's training loss, is NaN or infinite.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from core.settings import Settings, get_settings

VANISHING_GRADIENT = "vanishing_gradient"
EXPLODING_GRADIENT = "exploding_gradient"
DEAD_UNITS = "dead_units"
SNN_DRIFT = "snn_drift"
LOSS_NOT_FINITE = "loss_not_finite"
HEALTH_KINDS = (VANISHING_GRADIENT, EXPLODING_GRADIENT, DEAD_UNITS, SNN_DRIFT, LOSS_NOT_FINITE)

# One sentence each, drawn from the course (Xavier/He initialisation, ReLU/LeakyReLU, BatchNorm, Highway and
# residual forms, SELU with lecun_normal and AlphaDropout).
REMEDIES = {
    VANISHING_GRADIENT: "Replace sigmoid/tanh with ReLU or LeakyReLU and He initialisation, add BatchNorm, or "
    "give the network a Highway or residual form (or make it an SNN: selu, lecun_normal, AlphaDropout).",
    EXPLODING_GRADIENT: "Lower the learning rate, initialise with Xavier/He (scaled to each layer's fan-in), and "
    "add BatchNorm or a residual form so the gradient's scale stays bounded from layer to layer.",
    DEAD_UNITS: "Use LeakyReLU (or an SNN's SELU) instead of ReLU, He initialisation and a smaller learning rate, "
    "so that units pushed below zero can still recover.",
    SNN_DRIFT: "An SNN self-normalizes only with SELU, lecun_normal initialisation, AlphaDropout instead of "
    "Dropout, no BatchNorm and standardized inputs; restore the recipe or lower the learning rate.",
    LOSS_NOT_FINITE: "Lower the learning rate (tenfold), standardize the inputs, and keep activations bounded "
    "with Xavier/He initialisation and BatchNorm.",
}

# Blocks of the model that are not hidden blocks (models.build's names).
_HEAD_BLOCK = "output"
_NOT_HIDDEN = {"input", "output", "pool", "flatten"}
# The dry run predicts a vanishing gradient for a sigmoid MLP without BatchNorm from this many hidden layers.
PREDICT_VANISHING_DEPTH = 10


@dataclass(frozen=True)
class HealthThresholds:
    """The thresholds of the health rules (settings ``GPUYARD_HEALTH_*``, see core/settings.py)."""

    vanishing_ratio: float = 1e-3
    exploding_ratio: float = 1e3
    dead_units_share: float = 0.5
    snn_mean_tolerance: float = 0.1
    snn_variance_tolerance: float = 0.2
    snn_variance_floor: float = 0.01
    snn_variance_ceiling: float = 100.0


def thresholds_from(settings: Settings | None) -> HealthThresholds:
    """The thresholds a :class:`core.settings.Settings` holds (``None``: the process's settings)."""
    settings = settings or get_settings()
    return HealthThresholds(**{name: getattr(settings, f"health_{name}") for name in asdict(HealthThresholds())})


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _finding(
    kind: str, epoch: int, value: float | None, threshold: float | None, blocks: Sequence[str], detail: str
) -> dict[str, Any]:
    return {
        "kind": kind,
        "epoch": epoch,
        "value": value if value is None or math.isfinite(value) else None,
        "threshold": threshold,
        "blocks": list(blocks),
        "detail": detail,
        "remedy": REMEDIES[kind],
    }


def hidden_blocks(record: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The record's hidden blocks with trainable weights, input to output, the output layer left out.

    A block counts as weighted when its ``parameters`` entry is above 0 (records from before that entry
    existed: when its gradient norm is not exactly 0). Without a block named ``output`` (a keras_json model)
    the last weighted block is taken as the head.
    """
    blocks: Mapping[str, dict[str, Any]] = record.get("blocks") or {}
    weighted = []
    for name, entry in blocks.items():
        counted = "parameters" in entry
        if (entry.get("parameters") or 0) > 0 if counted else entry.get("gradient_norm") != 0:
            weighted.append((name, entry))
    if any(name == _HEAD_BLOCK for name, _ in weighted):
        return [(name, entry) for name, entry in weighted if name != _HEAD_BLOCK]
    return weighted[:-1]


def _gradient_findings(record: Mapping[str, Any], epoch: int, thresholds: HealthThresholds) -> list[dict[str, Any]]:
    layers = record.get("gradient_norms") or {}
    blocks = record.get("blocks") or {}
    bad_layers = [name for name, norm in layers.items() if not _finite(norm)]
    bad_blocks = [
        name for name, entry in blocks.items() if "gradient_norm" in entry and not _finite(entry["gradient_norm"])
    ]
    if bad_layers or bad_blocks:
        concerned = bad_blocks or bad_layers
        return [
            _finding(
                EXPLODING_GRADIENT,
                epoch,
                None,
                None,
                concerned,
                f"The gradient is not finite (NaN or infinite) in {len(concerned)} block(s): "
                f"{', '.join(concerned[:5])}{', ...' if len(concerned) > 5 else ''}.",
            )
        ]
    hidden = [(name, float(entry["gradient_norm"])) for name, entry in hidden_blocks(record)]
    if len(hidden) < 2:
        return []
    (first_name, first), (last_name, last) = hidden[0], hidden[-1]
    if last <= 0:  # nothing reaches even the last hidden block: dead units, not a ratio to report
        return []
    ratio = first / last
    if ratio < thresholds.vanishing_ratio:
        starved = [name for name, norm in hidden if norm < thresholds.vanishing_ratio * last]
        return [
            _finding(
                VANISHING_GRADIENT,
                epoch,
                ratio,
                thresholds.vanishing_ratio,
                starved,
                f"The first hidden block {first_name} gets a gradient norm of {first:.3g}, {ratio:.2g} times the "
                f"last hidden block {last_name}'s {last:.3g} (threshold {thresholds.vanishing_ratio:g}); "
                f"{len(starved)} of {len(hidden)} hidden blocks are below it and barely learn.",
            )
        ]
    if ratio > thresholds.exploding_ratio:
        grown = [name for name, norm in hidden if norm > thresholds.exploding_ratio * last]
        return [
            _finding(
                EXPLODING_GRADIENT,
                epoch,
                ratio,
                thresholds.exploding_ratio,
                grown,
                f"The first hidden block {first_name} gets a gradient norm of {first:.3g}, {ratio:.2g} times the "
                f"last hidden block {last_name}'s {last:.3g} (threshold {thresholds.exploding_ratio:g}).",
            )
        ]
    return []


def _dead_unit_findings(record: Mapping[str, Any], epoch: int, thresholds: HealthThresholds) -> list[dict[str, Any]]:
    dead = {
        name: float(entry["dead_share"])
        for name, entry in (record.get("blocks") or {}).items()
        if _finite(entry.get("dead_share")) and entry["dead_share"] > thresholds.dead_units_share
    }
    if not dead:
        return []
    worst = max(dead, key=dead.__getitem__)
    return [
        _finding(
            DEAD_UNITS,
            epoch,
            dead[worst],
            thresholds.dead_units_share,
            list(dead),
            f"{len(dead)} block(s) have more than {thresholds.dead_units_share:.0%} of their ReLU units never "
            f"active on the probe batch; worst {worst} with {dead[worst]:.0%}.",
        )
    ]


def _snn_tolerances(thresholds: HealthThresholds, units: Any) -> tuple[float, float]:
    """The epoch-0 bands of a block with ``units`` units: the settings, widened for narrow blocks.

    A finite layer's statistics wander around the fixed point by about 1/sqrt(units) (mean) and
    sqrt(2/units) (variance) per layer: a healthy 32-unit SNN of 32 blocks has blocks at variance 0.54 and
    1.34, while a broken one (he_normal: 1.6 then 4.5 and up; relu, tanh, elu: 0.35 then below 0.05) leaves
    any band. The bands are max(setting, 1/sqrt(units)) and max(setting, 2·sqrt(2/units)).
    """
    if not isinstance(units, int) or units <= 0:
        return thresholds.snn_mean_tolerance, thresholds.snn_variance_tolerance
    return (
        max(thresholds.snn_mean_tolerance, 1 / math.sqrt(units)),
        max(thresholds.snn_variance_tolerance, 2 * math.sqrt(2 / units)),
    )


def _snn_findings(record: Mapping[str, Any], epoch: int, thresholds: HealthThresholds) -> list[dict[str, Any]]:
    drifted: dict[str, tuple[float | None, float | None]] = {}
    for name, entry in (record.get("blocks") or {}).items():
        if name in _NOT_HIDDEN or "activation_mean" not in entry:
            continue
        mean, std = entry.get("activation_mean"), entry.get("activation_std")
        if not (_finite(mean) and _finite(std)):
            drifted[name] = (None, None)
            continue
        variance = float(std) ** 2
        if epoch == 0:
            mean_tolerance, variance_tolerance = _snn_tolerances(thresholds, entry.get("units"))
            off = abs(mean) > mean_tolerance or abs(variance - 1) > variance_tolerance
        else:
            off = not thresholds.snn_variance_floor <= variance <= thresholds.snn_variance_ceiling
        if off:
            drifted[name] = (float(mean), variance)
    if not drifted:
        return []
    shown = ", ".join(
        f"{name} (mean {m:.3g}, variance {v:.3g})" if m is not None and v is not None else f"{name} (not finite)"
        for name, (m, v) in list(drifted.items())[:4]
    )
    more = f" and {len(drifted) - 4} more" if len(drifted) > 4 else ""
    if epoch == 0:
        bound = (
            f"mean 0 ± {thresholds.snn_mean_tolerance:g} and variance 1 ± {thresholds.snn_variance_tolerance:g} "
            "at initialisation"
        )
    else:
        floor, ceiling = thresholds.snn_variance_floor, thresholds.snn_variance_ceiling
        bound = f"variance between {floor:g} and {ceiling:g} while training"
    variances = [v for _, v in drifted.values() if v is not None]
    value = max(variances, key=lambda v: abs(math.log(v)) if v > 0 else math.inf) if variances else None
    return [
        _finding(
            SNN_DRIFT,
            epoch,
            value,
            None,
            list(drifted),
            f"{len(drifted)} SNN block(s) left the self-normalizing range ({bound}): {shown}{more}.",
        )
    ]


def _loss_findings(record: Mapping[str, Any], epoch: int, train_loss: Any) -> list[dict[str, Any]]:
    bad = []
    if "probe_loss" in record and not _finite(record["probe_loss"]):
        bad.append("probe batch loss")
    if train_loss is not None and not _finite(train_loss):
        bad.append("training loss")
    if not bad:
        return []
    return [
        _finding(
            LOSS_NOT_FINITE,
            epoch,
            None,
            None,
            [],
            f"The {' and the '.join(bad)} {'is' if len(bad) == 1 else 'are'} not finite (NaN or infinite): the "
            "weights have overflowed and training cannot recover.",
        )
    ]


def health_events(
    record: Mapping[str, Any],
    *,
    family: str,
    thresholds: HealthThresholds | None = None,
    epoch: int | None = None,
    train_loss: float | None = None,
) -> list[dict[str, Any]]:
    """Every health finding of one diagnostics record.

    Args:
        record: one record of ``diagnostics.json`` (``worker.trainer.diagnostics.Diagnostics.record``), raw
            or JSON-safe (NaN written as null both count as not finite).
        family: the spec's ``architecture.family``; ``snn_drift`` is checked for ``"snn"`` only.
        thresholds: the rules' thresholds; default :class:`HealthThresholds` ().
        epoch: completed epochs (0 = before training); default the record's ``epoch``.
        train_loss: the epoch's training loss from Keras' logs, when known.

    Returns:
        Findings (see the module's docstring), in the order of :data:`HEALTH_KINDS`; empty when healthy.
    """
    thresholds = thresholds or HealthThresholds()
    epoch = int(record.get("epoch", 0) if epoch is None else epoch)
    findings = _gradient_findings(record, epoch, thresholds)
    findings += _dead_unit_findings(record, epoch, thresholds)
    if family == "snn":
        findings += _snn_findings(record, epoch, thresholds)
    findings += _loss_findings(record, epoch, train_loss)
    return findings


def signature(findings: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """What a list of findings says, without numbers or blocks (which shift a little every epoch): its kinds."""
    return frozenset(f["kind"] for f in findings)


class HealthWatch:
    """Decides when findings are news, so that a job's stream is not a flicker of the same few kinds.

    News: a kind that was not reported before (at once), or a reported kind absent for ``clear_after``
    checks in a row (a ratio hovering at its threshold comes and goes from epoch to epoch; it is cleared
    only once it stays away). An empty list at the start is not news. When there is news, the current
    findings are what gets reported.

    Args:
        clear_after: consecutive checks without a reported kind before it counts as cleared.
    """

    def __init__(self, clear_after: int = 3) -> None:
        if clear_after < 1:
            raise ValueError(f"Expected clear_after >= 1. Received: clear_after={clear_after}")
        self.clear_after = clear_after
        self.reported: frozenset[str] = frozenset()
        self._absent: dict[str, int] = {}

    def update(self, findings: Sequence[Mapping[str, Any]]) -> bool:
        """Take this check's findings; True when they should be emitted."""
        kinds = signature(findings)
        for kind in self.reported - kinds:
            self._absent[kind] = self._absent.get(kind, 0) + 1
        for kind in kinds:
            self._absent.pop(kind, None)
        cleared = {kind for kind, count in self._absent.items() if count >= self.clear_after}
        if kinds - self.reported or cleared:
            self.reported = kinds
            self._absent = {}
            return True
        return False


def predict_health(spec: Any) -> list[dict[str, Any]]:
    """Findings predictable from a spec alone, before any training (the dry run reports them).

    Only what the course shows beyond doubt: an MLP of ``PREDICT_VANISHING_DEPTH`` or more sigmoid hidden
    layers without BatchNorm has a vanishing gradient whatever its data (each sigmoid scales the gradient by at
    most 1/4). Everything else needs the diagnostics of a real probe batch.

    Args:
        spec: a validated :class:`models.spec.JobSpec`.

    Returns:
        Findings with ``epoch`` None and ``predicted`` True.
    """
    arch = spec.architecture
    if arch.family != "mlp" or arch.activation != "sigmoid" or arch.batch_norm:
        return []
    depth = len(arch.widths)
    if depth < PREDICT_VANISHING_DEPTH:
        return []
    bound = 0.25 ** (depth - 1)
    finding = _finding(
        VANISHING_GRADIENT,
        0,
        None,
        None,
        [f"dense{i}" for i in range(1, depth)],
        f"A {depth}-layer sigmoid MLP without BatchNorm: each sigmoid passes back at most 1/4 of the gradient, "
        f"so the first layer's share can be as small as 0.25^{depth - 1} = {bound:.1g} of the last's.",
    )
    return [{**finding, "epoch": None, "predicted": True}]

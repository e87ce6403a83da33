"""The health rules on hand-made diagnostics records: each kind fires on its numbers and stays quiet otherwise."""

from __future__ import annotations

import math
from typing import Any

import pytest

from core.settings import Settings
from models.health import (
    HEALTH_KINDS,
    REMEDIES,
    HealthThresholds,
    HealthWatch,
    health_events,
    predict_health,
    thresholds_from,
)
from models.spec import parse_spec


def record(norms: list[float], *, epoch: int = 0, probe_loss: float = 2.3, **extra: dict[str, Any]) -> dict[str, Any]:
    """A record of an MLP: blocks dense1..denseN with these gradient norms, then the output layer."""
    blocks: dict[str, dict[str, Any]] = {"input": {"gradient_norm": 0.0, "parameters": 0}}
    for index, norm in enumerate(norms, start=1):
        blocks[f"dense{index}"] = {"gradient_norm": norm, "parameters": 100, "activation_mean": 0.0,
                                   "activation_std": 1.0, "units": 64, **extra.get(f"dense{index}", {})}  # fmt: skip
    blocks["output"] = {"gradient_norm": 1.0, "parameters": 50}
    return {"epoch": epoch, "probe_loss": probe_loss, "gradient_norms": {}, "blocks": blocks}


def kinds(findings: list[dict[str, Any]]) -> list[str]:
    return [f["kind"] for f in findings]


def test_healthy_record_raises_nothing() -> None:
    assert health_events(record([0.5, 0.8, 1.0, 1.2]), family="mlp", epoch=0) == []


def test_vanishing_below_the_ratio_names_the_starved_blocks() -> None:
    findings = health_events(record([1e-9, 1e-6, 1e-2, 1.0]), family="mlp", epoch=0)
    assert kinds(findings) == ["vanishing_gradient"]
    assert findings[0]["value"] == pytest.approx(1e-9)
    assert findings[0]["blocks"] == ["dense1", "dense2"]
    assert findings[0]["remedy"] == REMEDIES["vanishing_gradient"]
    # Just above the threshold: quiet.
    assert health_events(record([2e-3, 1.0]), family="mlp", epoch=0) == []


def test_exploding_above_the_ratio_or_on_a_non_finite_gradient() -> None:
    assert kinds(health_events(record([5e3, 1.0]), family="mlp", epoch=1)) == ["exploding_gradient"]
    for bad in (math.nan, math.inf, None):  # None: NaN after the trainer made the record JSON-safe
        findings = health_events(record([1.0, bad, 1.0]), family="mlp", epoch=3)  # type: ignore[list-item]
        assert kinds(findings) == ["exploding_gradient"] and findings[0]["blocks"] == ["dense2"]


def test_thresholds_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUYARD_HEALTH_VANISHING_RATIO", "1e-12")
    thresholds = thresholds_from(Settings())
    assert thresholds.vanishing_ratio == 1e-12
    assert health_events(record([1e-9, 1.0]), family="mlp", thresholds=thresholds, epoch=0) == []


def test_dead_units_above_the_share() -> None:
    dead = {"dense2": {"relu_units": 64, "dead_share": 0.75}, "dense3": {"relu_units": 64, "dead_share": 0.2}}
    findings = health_events(record([1.0, 1.0, 1.0], **dead), family="mlp", epoch=2)
    assert kinds(findings) == ["dead_units"]
    assert findings[0]["blocks"] == ["dense2"] and findings[0]["value"] == 0.75


def snn_record(stats: list[tuple[float, float]], *, epoch: int, units: int = 256) -> dict[str, Any]:
    blocks = {f"snn{i}": {"gradient_norm": 1.0, "parameters": 10, "activation_mean": m, "activation_std": math.sqrt(v),
                          "units": units} for i, (m, v) in enumerate(stats, start=1)}  # fmt: skip
    blocks["output"] = {"gradient_norm": 1.0, "parameters": 10, "activation_mean": 0.1, "activation_std": 0.2}
    return {"epoch": epoch, "probe_loss": 1.0, "gradient_norms": {}, "blocks": blocks}


def test_snn_drift_at_initialisation_uses_the_tight_band() -> None:
    healthy = [(0.05, 0.9), (-0.08, 1.15), (0.0, 1.0)]
    assert health_events(snn_record(healthy, epoch=0), family="snn", epoch=0) == []
    findings = health_events(snn_record([(0.0, 1.0), (0.3, 1.0), (0.0, 1.5)], epoch=0), family="snn", epoch=0)
    assert kinds(findings) == ["snn_drift"] and findings[0]["blocks"] == ["snn2", "snn3"]
    # Other families never get snn_drift.
    assert health_events(snn_record([(0.3, 4.0)], epoch=0), family="mlp", epoch=0) == []


def test_snn_drift_band_widens_for_narrow_blocks() -> None:
    """A healthy 32-unit SNN wanders to variance 0.54-1.34 (measured); a broken one leaves any band."""
    narrow = [(0.0, 0.6), (0.15, 1.3)]
    assert health_events(snn_record(narrow, epoch=0, units=32), family="snn", epoch=0) == []
    assert kinds(health_events(snn_record(narrow, epoch=0, units=512), family="snn", epoch=0)) == ["snn_drift"]
    broken = [(0.0, 1.6), (0.25, 4.5)]  # he_normal instead of lecun_normal, 32 units
    assert kinds(health_events(snn_record(broken, epoch=0, units=32), family="snn", epoch=0)) == ["snn_drift"]


def test_snn_drift_while_training_flags_breakdown_not_learning() -> None:
    learning = [(0.3, 1.1), (0.5, 5.3), (-0.2, 2.0)]  # what a 32-block SNN on digits does after two epochs
    assert health_events(snn_record(learning, epoch=2), family="snn", epoch=2) == []
    collapsed = [(0.3, 1.1), (-1.75, 1e-4)]
    findings = health_events(snn_record(collapsed, epoch=4), family="snn", epoch=4)
    assert kinds(findings) == ["snn_drift"] and findings[0]["blocks"] == ["snn2"]
    blown = [(3.0, 500.0)]
    assert kinds(health_events(snn_record(blown, epoch=4), family="snn", epoch=4)) == ["snn_drift"]


def test_loss_not_finite_from_the_probe_or_the_epoch() -> None:
    assert kinds(health_events(record([1.0, 1.0], probe_loss=math.nan), family="mlp", epoch=1)) == ["loss_not_finite"]
    assert kinds(health_events(record([1.0, 1.0]), family="mlp", epoch=1, train_loss=math.inf)) == ["loss_not_finite"]


def test_every_kind_has_a_one_sentence_remedy() -> None:
    assert set(REMEDIES) == set(HEALTH_KINDS)
    for remedy in REMEDIES.values():
        assert remedy.endswith(".") and remedy.count(". ") == 0


def test_watch_reports_news_only() -> None:
    watch = HealthWatch(clear_after=3)
    assert watch.update([]) is False  # nothing at epoch 0 is not an event
    vanishing = health_events(record([1e-9, 1.0]), family="mlp", epoch=0)
    assert watch.update(vanishing) is True
    assert watch.update(health_events(record([1e-8, 1.0], epoch=1), family="mlp")) is False  # same kind
    # A ratio hovering at the threshold: gone for two checks, back on the third, is not news.
    assert [watch.update([]), watch.update([]), watch.update(vanishing)] == [False, False, False]
    dead = health_events(record([1.0, 1.0], dense1={"relu_units": 8, "dead_share": 1.0}), family="mlp", epoch=5)
    assert watch.update(vanishing + dead) is True  # a new kind at once
    assert [watch.update([]), watch.update([]), watch.update([])] == [False, False, True]  # cleared for good
    assert watch.reported == frozenset()


def test_default_thresholds_match_the_settings() -> None:
    assert thresholds_from(Settings()) == HealthThresholds()


@pytest.mark.parametrize(
    ("architecture", "predicted"),
    [
        ({"family": "mlp", "widths": [32] * 20, "activation": "sigmoid"}, True),
        ({"family": "mlp", "widths": [32] * 20, "activation": "sigmoid", "batch_norm": True}, False),
        ({"family": "mlp", "widths": [32] * 4, "activation": "sigmoid"}, False),
        ({"family": "mlp", "widths": [32] * 20, "activation": "relu"}, False),
        ({"family": "highway", "depth": 20, "width": 32, "activation": "sigmoid"}, False),
    ],
)
def test_predicted_from_the_spec(architecture: dict[str, Any], predicted: bool) -> None:
    findings = predict_health(parse_spec({"architecture": architecture}))
    assert kinds(findings) == (["vanishing_gradient"] if predicted else [])
    if predicted:
        assert findings[0]["predicted"] is True and findings[0]["remedy"]

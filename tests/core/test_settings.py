"""Settings: one GPUYARD_ prefix over two layers, the data limits that models may see and the rest."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from core.settings import DataLimits, Settings


def test_the_data_limits_are_a_base_of_the_settings_with_the_same_variable_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GPUYARD_MAX_CLASSES", "12")
    monkeypatch.setenv("GPUYARD_LEASE_SECONDS", "7")
    assert DataLimits().max_classes == Settings().max_classes == 12
    assert Settings().lease_seconds == 7
    assert set(DataLimits.model_fields) < set(Settings.model_fields)
    assert "lease_seconds" not in DataLimits.model_fields  # models never sees the service's settings


def test_paths_default_from_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.database_url == f"sqlite:///{(tmp_path / 'gpuyard.db').as_posix()}"
    assert settings.storage_dir == tmp_path / "storage"


def test_a_bad_value_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUYARD_MAX_DECLARED_RATIO", "0.5")
    with pytest.raises(ValidationError, match="max_declared_ratio"):
        DataLimits()

"""gpuyard's one typed configuration object, read from ``GPUYARD_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every setting gpuyard reads. Each field is documented; the README's table is generated from here."""

    model_config = SettingsConfigDict(env_prefix="GPUYARD_", extra="ignore")

    data_dir: Path = Field(Path(".gpuyard"), description="Where the local stack keeps its DB, storage and logs.")

    # HDF5 data sets (models.data)
    max_declared_ratio: float = Field(
        1000.0,
        gt=1,
        description="Refuse a dataset whose declared size exceeds its stored size by more than this factor "
        "(fill-value and compression bombs), once the declared size passes max_declared_bytes_unchecked.",
    )
    max_declared_bytes_unchecked: int = Field(
        64 * 2**20, ge=0, description="Declared sizes up to this many bytes are never counted as bombs."
    )
    max_declared_bytes: int = Field(
        64 * 2**30, gt=0, description="Refuse any dataset declaring more than this many bytes in total."
    )
    in_memory_limit_bytes: int = Field(
        2 * 2**30,
        gt=0,
        description="Data sets up to this size are loaded into memory; larger ones stream from HDF5 in batches.",
    )
    validate_memory_bytes: int = Field(
        2 * 2**30, gt=0, description="Address-space limit of the sandboxed HDF5 validator process."
    )
    validate_cpu_seconds: int = Field(120, gt=0, description="CPU-time limit of the sandboxed HDF5 validator.")
    scan_slice_bytes: int = Field(
        16 * 2**20, gt=0, description="Bytes read per slice when scanning a dataset for NaN/Inf and labels."
    )

    # Trainer
    progress_interval_s: float = Field(0.5, gt=0, description="Minimum seconds between two batch progress events.")
    probe_batch_size: int = Field(64, gt=0, description="Rows in the fixed batch used for per-layer diagnostics.")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()

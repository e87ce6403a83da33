"""Automatic GPU budgets: ``memory_fraction: "auto"`` sized from the model's estimate and measured peaks.

The model, kept simple on purpose:

    need      = estimated training memory (models/size.py: weights, gradients, optimizer slots, one batch's
                activations) × correction
    correction = the median of measured peak ÷ estimate over the latest succeeded jobs of the same
                architecture family that recorded a GPU peak (at most 20); with none yet, 'auto' stands
                for the unsized default (0.25) and that job's peak is the first sample
    fraction  = the smallest fraction, in hundredths, whose budget (fraction × GPU total + the context
                allowance) holds need × memory_margin, on the smallest GPU the job may run on

The correction learns what the estimate leaves out (the framework's own working memory, a CUDA context,
RSS on fake GPUs) from what the watchdog measured, per family; the margin covers the spread. A job that
still runs out is requeued once at its measured peak plus margin (worker/supervisor.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from core.settings import Settings
from models.data.summary import DatasetSummary
from models.size import estimated_training_bytes, model_size
from models.spec import UNSIZED_FRACTION, JobSpec, parse_spec
from store import Database
from worker.gpus import context_allowance_bytes, fraction_for
from worker.placement import GpuView

_SAMPLES = 20


@dataclass(frozen=True)
class AutoBudget:
    """What 'auto' became, and why (shown in the job's events and the dry run)."""

    memory_fraction: float
    estimate_bytes: int | None
    correction: float
    samples: int
    detail: str
    sized: bool = True  # False: no estimate or no GPU to size it for; it stands for the unsized default


def estimate_bytes(spec: JobSpec, summary: DatasetSummary) -> int | None:
    """The model's estimated training memory, or None when it cannot be estimated (keras_json)."""
    size = model_size(spec, list(summary.input_shape), summary.output_dim)
    return None if size is None else estimated_training_bytes(spec, size)


def peak_correction(db: Database, family: str) -> tuple[float, int]:
    """The median measured peak ÷ estimate of the latest jobs of ``family`` that recorded a GPU peak."""
    ratios = []
    for job, summary in db.recent_peaks(family, limit=_SAMPLES):
        try:
            estimate = estimate_bytes(parse_spec(job.spec), DatasetSummary.model_validate(summary))
        except Exception:  # an old spec or summary this code no longer reads: skip that sample
            continue
        if estimate and job.peak_gpu_memory_bytes:
            ratios.append(job.peak_gpu_memory_bytes / estimate)
    return (statistics.median(ratios), len(ratios)) if ratios else (1.0, 0)


def auto_budget(
    db: Database, settings: Settings, spec: JobSpec, summary: DatasetSummary, gpus: Sequence[GpuView]
) -> AutoBudget:
    """Size ``spec``'s memory fraction (see the module docstring)."""
    request = spec.resources.gpu
    totals = [g.memory_total_bytes for g in gpus if request in ("any", g.uuid)]
    estimate = estimate_bytes(spec, summary)
    if request == "cpu" or not totals or estimate is None:
        why = "no estimate for keras_json" if estimate is None else "no GPU to size it for"
        detail = f"auto: {why}; memory_fraction {UNSIZED_FRACTION:g}"
        return AutoBudget(UNSIZED_FRACTION, estimate, 1.0, 0, detail, sized=False)
    correction, samples = peak_correction(db, spec.architecture.family)
    if samples == 0:  # the estimate leaves out the framework's own memory: without a measurement, no guess
        detail = (
            f"auto: no {spec.architecture.family} job has a measured GPU peak yet; memory_fraction "
            f"{UNSIZED_FRACTION:g} until one has"
        )
        return AutoBudget(UNSIZED_FRACTION, estimate, 1.0, 0, detail, sized=False)
    need = int(estimate * correction)
    fraction = fraction_for(need, min(totals), context_allowance_bytes(settings), settings.memory_margin)
    detail = (
        f"auto: estimate {estimate / 2**20:,.1f} MiB × {correction:.2f} (measured peak ÷ estimate, "
        f"{samples} earlier {spec.architecture.family} jobs) × margin {settings.memory_margin:g} → "
        f"memory_fraction {fraction:g} of a {min(totals) / 2**30:.0f} GiB GPU"
    )
    return AutoBudget(fraction, estimate, correction, samples, detail)

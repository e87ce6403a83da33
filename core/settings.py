"""gpuyard's one typed configuration object, read from ``GPUYARD_*`` environment variables.

One object, one prefix, its fields grouped by who reads them (as Celery's ``app/defaults.py`` namespaces
them)::

    Settings ─┬─ LimitsSettings ── DataLimits   what users may ask for; the HDF5 checks' own (all models.data sees)
              ├─ ServerSettings                 the API process: job store, queue, storage, dry run, streams
              ├─ WorkerSettings                 Celery workers, supervisor, janitor, dispatcher, trainer, GPUs
              └─ ClientSettings                 the gpuyard commands that talk to the API (URL, token)

Callers read ``get_settings().<field>`` as before; each group is a plain pydantic-settings class with the
same variable names, so a part that needs only its own can be typed with its group.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class _GpuyardSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GPUYARD_", extra="ignore")


class DataLimits(_GpuyardSettings):
    """The limits of the HDF5 data-set checks (``models.data``): sizes, scanning, the validator's rlimits."""

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
    max_classes: int = Field(
        100_000, ge=2, description="Refuse integer labels implying more classes than this (largest label+1)."
    )
    scan_slice_bytes: int = Field(
        16 * 2**20, gt=0, description="Bytes read per slice when scanning a dataset for NaN/Inf and labels."
    )


class LimitsSettings(DataLimits):
    """What users may ask for: model size (checked at submit from the spec alone, models/size.py), uploads,
    jobs, studies, streams and GPU shares per user; with :class:`DataLimits`, the HDF5 checks'."""

    # Model size, checked at submit from the spec alone (models/size.py)
    max_model_parameters: int = Field(
        50_000_000, gt=0, description="Refuse at submit a model with more parameters than this (200 MB of float32)."
    )
    max_training_memory_bytes: int = Field(
        8 * 2**30,
        gt=0,
        description="Refuse at submit a model whose estimated memory for one training step (weights, gradients, "
        "optimizer state, one batch's activations; the dry run's formula) exceeds this many bytes.",
    )
    max_model_depth: int = Field(
        1000,
        gt=0,
        description="Refuse at submit more hidden layers or blocks than this (mlp/snn widths, highway depth, "
        "resnet blocks or the sum of stages, cnn filters; a keras_json model's layers).",
    )
    max_layer_width: int = Field(
        65536, gt=0, description="Refuse at submit a layer with more units or filters than this."
    )
    default_max_runtime_s: int = Field(
        86_400,
        ge=0,
        description="resources.max_runtime_s given to a job whose spec sets none (0: no limit).",
    )

    # Per user and per request
    max_upload_bytes: int = Field(2 * 2**30, gt=0, description="Largest data set upload accepted, in bytes.")
    upload_read_timeout_s: float = Field(
        30.0,
        gt=0,
        description="An upload that sends no bytes for this many seconds is cut off (408) and its staging file "
        "removed at once.",
    )
    max_active_jobs_per_user: int = Field(
        4, ge=1, description="Queued plus running jobs one user may have; more answer 429."
    )
    max_parallel_trials: int = Field(
        8,
        ge=1,
        description="The most queued plus running trials one study may have (its max_parallel is clipped to "
        "this); a study's trials do not count against max_active_jobs_per_user (docs/studies.md).",
    )
    max_active_studies_per_user: int = Field(2, ge=1, description="Active studies one user may have; more answer 429.")
    max_streams_per_user: int = Field(
        20,
        ge=1,
        description="Event streams (GET /v1/jobs/<id>/events) one user may hold open at once; more answer 429.",
    )
    max_predict_bytes: int = Field(
        1 * 2**20,
        gt=0,
        description="Largest body POST /v1/jobs/<id>/predict accepts (a JSON batch or an HDF5 file with X), "
        "in bytes; larger answers 413. Bigger batches: evaluate an uploaded data set, or download the model.",
    )
    max_gpu_fraction_per_user: float = Field(
        2.0,
        gt=0,
        description="The most GPU (sum of memory_fraction over running and dispatched jobs) one user holds.",
    )


class ServerSettings(_GpuyardSettings):
    """What the API process reads: the job store, the queue, storage, the dry run, event streams, metrics
    and sessions (service/, store/, worker/storage.py)."""

    # Where things live
    data_dir: Path = Field(Path(".gpuyard"), description="Where the local stack keeps its DB, storage and logs.")
    database_url: str = Field(
        "",
        description="SQLAlchemy URL of the job database, e.g. postgresql+psycopg://user@host/gpuyard. "
        "Empty: SQLite at <data_dir>/gpuyard.db.",
    )
    redis_url: str = Field(
        "redis://localhost:6379/0", description="Redis URL: the Celery broker, and what /v1/ready checks."
    )
    train_queue: str = Field(
        "gpuyard.jobs",
        description="Celery queue of CPU jobs (resources.gpu 'cpu', or any job where no GPU is registered); "
        "GPU jobs go to gpu.<uuid>, one queue per GPU.",
    )
    storage_dir: Path | None = Field(
        None, description="Root of local storage (data sets, job artifacts). Empty: <data_dir>/storage."
    )
    tmp_max_age_s: float = Field(
        3600.0,
        gt=0,
        description="Staging files of uploads (storage tmp/) older than this many seconds are removed when the "
        "API starts and by every janitor pass: what a killed upload left behind.",
    )

    # Jobs as the API creates them
    max_attempts: int = Field(
        3, ge=1, description="Attempts a job gets before a lost worker marks it interrupted, not requeued."
    )

    # The dry run, out of process (service/checks.py)
    dry_run_timeout_s: float = Field(
        120.0, gt=0, description="Seconds the API waits for a dry-run subprocess (it builds the Keras model)."
    )
    dry_run_memory_bytes: int = Field(
        4 * 2**30,
        gt=0,
        description="Address-space limit (RLIMIT_AS) of the dry-run child process the API starts; a dry run "
        "past it is refused with 422. The examples' dry runs (TensorFlow, CPU) need about 1.5 GiB.",
    )
    dry_run_concurrency: int = Field(
        2, ge=1, description="Dry runs one API process runs at once; more answer 429 with Retry-After."
    )

    # Event streams, metrics, sessions
    sse_poll_interval_s: float = Field(
        0.5,
        gt=0,
        description="Seconds between two job-event polls of the database in an SSE stream while Redis "
        "pub/sub is unreachable (otherwise a stream sleeps until its job publishes an event).",
    )
    sse_keepalive_s: float = Field(
        15.0, gt=0, description="Seconds of silence after which an SSE stream sends a keep-alive comment."
    )
    principal_recheck_s: float = Field(
        3.0,
        gt=0,
        description="Seconds between two checks, in an open event stream, that its user may still act (exists, "
        "not disabled, token not rotated); a stream whose user may not ends.",
    )
    sse_batch_interval_s: float = Field(
        0.5,
        ge=0,
        description="Least seconds between two reads of the job DB by one event stream while its job publishes "
        "batch progress: the batch events of that time are coalesced to the latest. 0: every event.",
    )
    metrics_token: str = Field(
        "",
        description="Bearer token a Prometheus scraper sends to read GET /metrics from another host, and to see "
        "the per-job series (an admin's token does too); without a token only scrapers on this host (loopback) "
        "read it, and only the aggregate series.",
    )
    secret_key: str = Field(
        "",
        description="Signs the dashboard's session cookies and CSRF tokens; every API process must share it. "
        "Empty: a random key kept in <data_dir>/secret-key (mode 0600), made on first start.",
    )


class WorkerSettings(_GpuyardSettings):
    """What the Celery workers, the supervisor, the janitor, the dispatcher and the trainer read."""

    # Trainer (worker/trainer/)
    trainer_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="Niceness added to trainer processes (warm trainers and operation children too) so that the "
        "API, Redis and the janitor stay responsive while training saturates the CPUs. 0: same priority.",
    )
    progress_interval_s: float = Field(0.5, gt=0, description="Minimum seconds between two batch progress events.")
    probe_batch_size: int = Field(64, gt=0, description="Rows in the fixed batch used for per-layer diagnostics.")
    tensorboard_histogram_every: int = Field(
        5,
        ge=0,
        description="Epochs between two TensorBoard weight/activation histograms (also before training and at the "
        "last epoch); 0 writes none. Scalars are written every epoch.",
    )
    checkpoint_seconds: float = Field(
        30.0,
        ge=0,
        description="Minimum seconds of training between two checkpoints (besides the one after the last epoch "
        "and the one on a stop); stretched so that saving takes at most 1 % of the time. 0: every epoch.",
    )
    diagnostics_share: float = Field(
        0.01,
        gt=0,
        le=1,
        description="Share of training time the per-layer diagnostics probe may take: it runs after an epoch "
        "once training since the last probe took 1/share times the probe's own duration (and after the first "
        "and last epochs). 1: after every epoch.",
    )

    # Training health (models/health.py): thresholds of the health events the trainer emits
    health_vanishing_ratio: float = Field(
        1e-3,
        gt=0,
        description="vanishing_gradient when the first hidden block's gradient norm is below this fraction of "
        "the last hidden block's (a 20-layer sigmoid MLP: about 1e-11; Highway, ResNet, SNN: 0.5-2).",
    )
    health_exploding_ratio: float = Field(
        1e3,
        gt=1,
        description="exploding_gradient when the first hidden block's gradient norm is above this multiple of "
        "the last hidden block's (a non-finite gradient always is).",
    )
    health_dead_units_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="dead_units when more than this share of a block's ReLU units is never active on the probe batch.",
    )
    health_snn_mean_tolerance: float = Field(
        0.1,
        gt=0,
        description="snn_drift at initialisation when a block's activation mean is outside 0 +/- this "
        "(at least 1/sqrt(units) for a narrow block: a finite layer's own noise).",
    )
    health_snn_variance_tolerance: float = Field(
        0.2,
        gt=0,
        description="snn_drift at initialisation when a block's activation variance is outside 1 +/- this "
        "(at least 2*sqrt(2/units) for a narrow block: a finite layer's own noise).",
    )
    health_snn_variance_floor: float = Field(
        0.01,
        gt=0,
        description="snn_drift after training started when a block's activation variance falls below this "
        "(the units collapsed to a constant); trained SNNs legitimately move away from variance 1.",
    )
    health_snn_variance_ceiling: float = Field(
        100.0,
        gt=1,
        description="snn_drift after training started when a block's activation variance rises above this "
        "(the activations blow up); a 32-block SNN on digits stays within 1-6 while it learns.",
    )

    # Celery workers, supervisor and janitor (worker/celery_app.py, worker/supervisor.py, worker/janitor.py)
    worker_gpu: str = Field(
        "cpu", description="What this worker's trainers run on: 'cpu' or a GPU UUID (one worker per GPU)."
    )
    warm_trainers: bool | None = Field(
        None,
        description="Keep one trainer per worker slot started ahead, its framework imported, waiting for the next "
        "job on a pipe (submit to first step in about a second instead of several). Empty: on for workers of "
        "a real GPU, off for CPU workers and fake GPUs (an idle trainer holds about 0.5 GB of host memory).",
    )
    trainer_command: str = Field(
        "",
        description="The command that starts a trainer (split like a shell would); empty: "
        "'<this python> -m worker.trainer'. Tests substitute a stand-in.",
    )
    lease_seconds: int = Field(
        60,
        gt=0,
        description="How long a worker's claim on a job lasts without renewal before the janitor may requeue it.",
    )
    visibility_timeout_s: int = Field(
        6 * 3600,
        gt=0,
        description="Redis redelivers a task not acknowledged within this many seconds (tasks ack when they "
        "end). Must exceed twice lease_seconds; a redelivery of a running job is a no-op (its lease is live).",
    )
    cancel_poll_s: float = Field(
        0.5, gt=0, le=1.0, description="Seconds between two checks of a running job's cancel flag."
    )
    cancel_grace_s: float = Field(
        3.0,
        gt=0,
        description="Seconds a trainer gets after SIGTERM (cancel, time limit) to checkpoint and exit "
        "before its process group is killed.",
    )
    trainer_memory_bytes: int | None = Field(
        None,
        gt=0,
        description="Host memory (RSS of its whole process group) a trainer may hold before it is killed and "
        "the job fails out_of_memory. Empty: half of this host's memory.",
    )
    trainer_kills_before_oom: int = Field(
        2,
        ge=1,
        description="A trainer killed by SIGKILL that gpuyard did not send (the kernel's OOM killer, an "
        "operator) is requeued and resumed from its checkpoint; killed this many times in a row, the job "
        "fails out_of_memory with the peak memory it reached.",
    )
    operation_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Seconds a model operation (evaluate, predict, export of a finished job) may run in its "
        "worker's child process before it is stopped and fails operation_time_limit.",
    )
    janitor_interval_s: float = Field(
        10.0, gt=0, description="Seconds between two janitor passes (requeue jobs whose lease expired)."
    )

    # Notifications when a job ends (worker/notify.py)
    notify_queue: str = Field(
        "gpuyard.notify",
        description="The Celery queue of notification tasks (gpuyard.notify); every gpuyard worker consumes it.",
    )
    notify_timeout_s: float = Field(
        5.0, gt=0, le=60, description="Connect and read timeout of one notification request."
    )
    notify_max_retries: int = Field(
        6,
        ge=0,
        description="Retries of a notification that fails (no answer, 5xx, 429), with exponential backoff "
        "from 2 s up to 10 min; then it is dropped and logged.",
    )
    notify_max_urls: int = Field(5, ge=0, description="The most notify URLs a job or a user may name.")
    notify_allowed_networks: str = Field(
        "",
        description="Comma-separated networks (CIDR) a webhook may reach although they are private, loopback or "
        "link-local, e.g. '10.0.0.0/8,127.0.0.1/32'. Empty: webhooks reach public addresses only.",
    )

    # GPUs: inventory, heartbeats, placement, memory watchdog, hygiene (worker/gpus.py, worker/dispatch.py)
    fake_gpus: str = Field(
        "",
        description="Simulate GPUs instead of asking NVML, e.g. '2x16GiB' (two 16 GiB devices) or "
        "'1x80GiB,1x40GiB'. Per-process memory then comes from fake_gpu_dir (declared figures) or RSS.",
    )
    fake_gpu_dir: Path | None = Field(
        None,
        description="Where fake GPUs keep their per-process memory declarations. Empty: <data_dir>/fake-gpus.",
    )
    gpu_heartbeat_s: float = Field(2.0, gt=0, description="Seconds between two GPU heartbeats of a worker.")
    gpu_heartbeat_ttl_s: float = Field(
        10.0, gt=0, description="A GPU whose last heartbeat is older than this is offline (Redis key TTL)."
    )
    gpu_slots: int = Field(
        4,
        ge=1,
        description="Jobs one GPU's worker runs at once at most. Within it the dispatcher packs jobs onto a GPU by "
        "their memory fractions (and the GPU's free memory); `gpuyard worker -c N` overrides it.",
    )
    gpu_reserve_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Share of every GPU kept free: the memory fractions of its jobs sum to at most 1 - this.",
    )
    gpu_context_allowance_bytes: int | None = Field(
        None,
        ge=0,
        description="Memory a job may hold beyond fraction x total before the watchdog kills it (the CUDA "
        "context and cuDNN/cuBLAS workspaces, which no framework cap covers). Empty: 1 GiB on real GPUs, "
        "0 on fake ones.",
    )
    gpu_watchdog_interval_s: float = Field(
        0.25, gt=0, le=1.0, description="Seconds between two reads of a running job's GPU memory."
    )
    gpu_hygiene_tolerance_bytes: int = Field(
        512 * 2**20,
        ge=0,
        description="After a job, the GPU memory no process accounts for may exceed what it was before the "
        "job by at most this much; more (or a process of the job still listed) quarantines the GPU.",
    )
    gpu_hygiene_wait_s: float = Field(
        5.0, ge=0, description="Seconds the hygiene check waits for the driver to release a finished job's memory."
    )
    memory_margin: float = Field(
        1.25,
        ge=1.0,
        description="Automatic budgets: memory_fraction 'auto' and suggested_memory_fraction are the expected "
        "(or measured) peak times this, as a fraction of the GPU.",
    )
    dispatch_stale_s: float = Field(
        120.0,
        gt=0,
        description="A job dispatched to a GPU that went offline and still not started after this many seconds "
        "is dispatched again.",
    )

    # The queue's order (worker/fairshare.py) and its forecast
    fair_share_half_life_s: float = Field(
        7200.0,
        gt=0,
        description="Fair sharing: a user's past GPU usage (memory fraction x seconds) counts half as much after "
        "this many seconds when ordering the queue.",
    )
    queue_aging_s: float = Field(
        14400.0,
        gt=0,
        description="Fair sharing: a waiting job's priority rises by one for every this many seconds it has "
        "waited, so nothing starves.",
    )
    preemption: bool = Field(
        True,
        description="Preemption (docs/scheduling.md): a job waiting for room may stop running jobs of strictly "
        "lower priority, which checkpoint and return to the queue. off: running jobs keep their GPU.",
    )
    preempt_after_s: float = Field(
        300.0,
        ge=0,
        description="Preemption: a waiting job preempts only after waiting this many seconds.",
    )
    preempt_min_run_s: float = Field(
        120.0,
        ge=0,
        description="Preemption: a job runs at least this many seconds before it can be preempted, and is "
        "preempted at most once per this many seconds.",
    )
    queue_default_job_s: float = Field(
        600.0,
        gt=0,
        description="Start estimates: the duration assumed for a job when no earlier job of its kind, its owner "
        "or anyone has finished yet.",
    )


class ClientSettings(_GpuyardSettings):
    """What the ``gpuyard`` commands that talk to the API read (service/client.py, cli/jobs.py)."""

    url: str = Field(
        "http://127.0.0.1:8000",
        description="Client side: base URL of the gpuyard API that the gpuyard commands talk to (overridden by --url).",
    )
    token: str = Field(
        "",
        description="Client side: bearer token the gpuyard commands send (overridden by --token); "
        "'gpuyard users create NAME' prints one, 'gpuyard up' the admin's.",
    )


class Settings(ClientSettings, WorkerSettings, ServerSettings, LimitsSettings):
    """Every setting gpuyard reads, one object (``get_settings()``); its fields grouped by who reads them
    (:data:`SETTING_GROUPS`). Each field is documented; ``.env.example`` and the README's table are
    generated from here (deploy/envdoc.py)."""

    @field_validator("notify_allowed_networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        """Refuse at start-up what the notify task could not parse (each entry a CIDR network or address)."""
        for entry in filter(None, (part.strip() for part in value.split(","))):
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError as exc:
                raise ValueError(f"Expected CIDR networks such as '10.0.0.0/8'. Received: {entry!r}") from exc
        return value

    @model_validator(mode="after")
    def _default_paths(self) -> Settings:
        """Fill the DB URL and storage root from ``data_dir`` when they are left empty."""
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'gpuyard.db').as_posix()}"
        if self.storage_dir is None:
            self.storage_dir = self.data_dir / "storage"
        if self.fake_gpu_dir is None:
            self.fake_gpu_dir = self.data_dir / "fake-gpus"
        return self


#: The groups, with the heading ``.env.example`` gives each (deploy/envdoc.py).
SETTING_GROUPS: tuple[tuple[str, type[BaseSettings]], ...] = (
    ("API server", ServerSettings),
    ("Workers and the trainer", WorkerSettings),
    ("Limits, what users may ask for", LimitsSettings),
    ("Client: the gpuyard commands", ClientSettings),
)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()

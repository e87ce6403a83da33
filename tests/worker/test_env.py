"""The trainer's process setup, computed without a GPU (NVML totals are passed in)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from core.exitcodes import ExitCode
from worker.trainer import env

UUID = "GPU-12345678-1234-1234-1234-123456789abc"
TOTAL = 80 * 2**30  # an 80 GiB card


def test_tensorflow_gpu_cap_is_fraction_of_nvml_total() -> None:
    plan = env.plan_environment(backend="tensorflow", device=UUID, memory_fraction=0.25, gpu_total_bytes=TOTAL)
    assert plan.environ["CUDA_VISIBLE_DEVICES"] == UUID
    assert plan.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert plan.environ["KERAS_BACKEND"] == "tensorflow"
    assert plan.memory_limit_mib == 20 * 1024
    assert "memory_limit=20480 MiB" in plan.memory_cap
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in plan.environ


def test_tensorflow_without_nvml_total_runs_uncapped_and_says_so() -> None:
    plan = env.plan_environment(backend="tensorflow", device=UUID, memory_fraction=0.5, gpu_total_bytes=None)
    assert plan.memory_limit_mib is None
    assert plan.memory_cap == "none"
    assert any("NVML" in note for note in plan.notes)


def test_jax_always_gets_a_fraction_and_keeps_preallocation_default() -> None:
    plan = env.plan_environment(backend="jax", device=UUID, memory_fraction=0.1, gpu_total_bytes=TOTAL)
    assert plan.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.1"
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in plan.environ
    unset = env.plan_environment(backend="jax", device="any", memory_fraction=None, gpu_total_bytes=None)
    assert unset.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.75"
    assert "CUDA_VISIBLE_DEVICES" not in unset.environ  # "any": leave what the parent set


def test_torch_cap_is_applied_after_import() -> None:
    plan = env.plan_environment(backend="torch", device=UUID, memory_fraction=0.3, gpu_total_bytes=TOTAL)
    assert "set_per_process_memory_fraction(0.3, 0)" in plan.memory_cap
    assert plan.memory_limit_mib is None


def test_cpu_hides_every_gpu_and_caps_nothing() -> None:
    for backend in env.BACKENDS:
        plan = env.plan_environment(backend=backend, device="cpu", memory_fraction=0.25, gpu_total_bytes=TOTAL)
        assert plan.environ["CUDA_VISIBLE_DEVICES"] == ""
        assert plan.memory_cap == "none"
        assert plan.memory_fraction is None
    assert (
        env.plan_environment(backend="jax", device="cpu", memory_fraction=None, gpu_total_bytes=None).environ[
            "JAX_PLATFORMS"
        ]
        == "cpu"
    )


@pytest.mark.parametrize(("backend", "fraction"), [("theano", 0.5), ("tensorflow", 0.0), ("tensorflow", 1.5)])
def test_bad_values_are_refused_with_the_value(backend: str, fraction: float) -> None:
    with pytest.raises(ValueError, match="Received"):
        env.plan_environment(backend=backend, device="cpu", memory_fraction=fraction, gpu_total_bytes=None)


def test_apply_sets_variables_and_keeps_callers_log_level() -> None:
    plan = env.plan_environment(backend="jax", device=UUID, memory_fraction=0.2, gpu_total_bytes=TOTAL)
    environ = {"TF_CPP_MIN_LOG_LEVEL": "0", "CUDA_VISIBLE_DEVICES": "0,1"}
    env.apply_environment(plan, environ)
    assert environ["CUDA_VISIBLE_DEVICES"] == UUID
    assert environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.2"
    assert environ["TF_CPP_MIN_LOG_LEVEL"] == "0"


def test_setup_happens_before_any_framework_import() -> None:
    """Importing the CLI module and planning the environment imports no framework."""
    code = (
        "import sys; import worker.trainer.cli, worker.trainer.env, worker.trainer.events, worker.gpus;"
        "bad = [m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_stop_flag_signal_and_time_limit() -> None:
    now = [100.0]
    flag = env.StopFlag(max_runtime_s=5, started=100.0, clock=lambda: now[0])
    flag.check()
    now[0] = 106.0
    with pytest.raises(env.TrainingStopped) as stopped:
        flag.check()
    assert stopped.value.exit_code is ExitCode.TIME_LIMIT
    flag = env.StopFlag()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        flag.install()
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(env.TrainingStopped) as stopped:
            flag.check()
        assert stopped.value.exit_code is ExitCode.CANCELLED
        assert "SIGTERM" in stopped.value.detail
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_nvml_without_driver_is_none() -> None:
    from core.settings import Settings
    from worker.gpus import gpu_total_memory_bytes

    total = gpu_total_memory_bytes(Settings(fake_gpus=""), UUID)
    assert total is None or total > 0


def test_fake_gpu_total_is_what_the_trainer_caps_against(tmp_path: Path) -> None:
    from core.settings import Settings
    from worker.gpus import fake_uuid, gpu_total_memory_bytes

    settings = Settings(fake_gpus="2x16GiB", fake_gpu_dir=tmp_path)
    assert gpu_total_memory_bytes(settings, fake_uuid(1)) == 16 * 2**30
    assert gpu_total_memory_bytes(settings) == 16 * 2**30
    assert gpu_total_memory_bytes(settings, "GPU-ffffffff-ffff-ffff-ffff-ffffffffffff") is None

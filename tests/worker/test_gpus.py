"""The GPU inventory: fake devices and their declared processes, NVML without a driver, selections,
heartbeats that tell gpuyard's processes from foreign ones."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from core.settings import Settings
from worker.fleet import plan_workers
from worker.gpus import (
    FakeBackend,
    GiB,
    NvmlBackend,
    declare_fake_process,
    fake_uuid,
    get_backend,
    parse_fake_gpus,
    select_gpus,
)
from worker.heartbeat import heartbeat


def test_fake_spec_parses_counts_and_sizes() -> None:
    assert parse_fake_gpus("2x16GiB") == [16 * GiB, 16 * GiB]
    assert parse_fake_gpus("1x80GiB, 1x512MiB") == [80 * GiB, 512 * 2**20]
    with pytest.raises(ValueError, match="Received: fake_gpus='two'"):
        parse_fake_gpus("two")


def test_fake_devices_have_stable_uuids_and_full_readings(tmp_path: Path) -> None:
    backend = FakeBackend("2x16GiB", tmp_path)
    devices = backend.devices()
    assert [d.uuid for d in devices] == [fake_uuid(0), fake_uuid(1)]
    assert fake_uuid(1) == "GPU-00000000-0000-0000-0000-000000000001"
    first = devices[0]
    assert (first.index, first.memory_total_bytes, first.memory_used_bytes, first.memory_free_bytes) == (
        0,
        16 * GiB,
        0,
        16 * GiB,
    )
    assert first.pci_bus_id and first.name and first.processes == []
    assert backend.device(fake_uuid(1)).index == 1 and backend.device("GPU-nope") is None


def test_fake_processes_count_declared_figures_rss_and_leaks_but_not_dead_pids(tmp_path: Path) -> None:
    backend = FakeBackend("1x16GiB", tmp_path)
    uuid = fake_uuid(0)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        declare_fake_process(tmp_path, uuid, sleeper.pid, 3 * GiB)
        declare_fake_process(tmp_path, uuid, os.getpid(), None)  # RSS
        declare_fake_process(tmp_path, uuid, dead.pid, 5 * GiB)  # gone: ignored
        declare_fake_process(tmp_path, uuid, None, GiB, name="leak")
        info = backend.device(uuid)
        by_pid = {p.pid: p.memory_bytes for p in info.processes}
        assert set(by_pid) == {sleeper.pid, os.getpid()}
        assert by_pid[sleeper.pid] == 3 * GiB
        assert by_pid[os.getpid()] == pytest.approx(psutil.Process().memory_info().rss, rel=0.2)
        assert info.unaccounted_bytes == GiB
        assert info.memory_used_bytes == 3 * GiB + by_pid[os.getpid()] + GiB
        assert info.memory_free_bytes == 16 * GiB - info.memory_used_bytes
    finally:
        sleeper.kill()
        sleeper.wait()


def test_nvml_without_a_driver_is_an_empty_inventory_and_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    except pynvml.NVMLError:
        pass
    backend = NvmlBackend()
    with caplog.at_level(logging.INFO, logger="worker.gpus"):
        assert backend.devices() == [] and backend.devices() == []
        assert backend.device("GPU-00000000-0000-0000-0000-000000000000") is None
    lines = [r for r in caplog.records if r.name == "worker.gpus"]
    assert len(lines) == 1 and "no GPUs" in lines[0].getMessage()


def test_settings_choose_the_backend(tmp_path: Path) -> None:
    assert get_backend(Settings(data_dir=tmp_path, fake_gpus="2x16GiB")).kind == "fake"
    assert get_backend(Settings(data_dir=tmp_path)).kind == "nvml"


def test_selections_by_all_index_and_uuid(tmp_path: Path) -> None:
    devices = FakeBackend("3x16GiB", tmp_path).devices()
    assert [d.index for d in select_gpus(devices, "all")] == [0, 1, 2]
    assert [d.index for d in select_gpus(devices, "2,0")] == [2, 0]
    assert [d.index for d in select_gpus(devices, fake_uuid(1))] == [1]
    with pytest.raises(ValueError, match="Received: '7'"):
        select_gpus(devices, "0,7")


def test_one_worker_per_gpu_each_on_its_queue(tmp_path: Path) -> None:
    workers = plan_workers(FakeBackend("2x16GiB", tmp_path), "all", slots=3, host="h")
    assert [(w.name, w.queue, w.slots) for w in workers] == [
        ("gpu0@h", f"gpu.{fake_uuid(0)}", 3),
        ("gpu1@h", f"gpu.{fake_uuid(1)}", 3),
    ]
    env = workers[1].env({"PATH": "/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == fake_uuid(1) and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["GPUYARD_WORKER_GPU"] == fake_uuid(1)
    assert plan_workers(FakeBackend("1x1GiB", tmp_path), "all", 1)[0].argv("INFO")[-6:] == [
        "--queues",
        f"gpu.{fake_uuid(0)}",
        "--hostname",
        workers[0].name.replace("@h", f"@{os.uname().nodename}"),
        "--loglevel",
        "INFO",
    ]


def test_gpus_all_also_serves_the_cpu_queue(tmp_path: Path) -> None:
    # CPU jobs go to the train queue (worker/dispatch.py): a host with GPUs must consume it too.
    workers = plan_workers(FakeBackend("2x16GiB", tmp_path), "all", slots=2, host="h", cpu_queue="gpuyard.jobs")
    assert [(w.name, w.queue, w.slots) for w in workers] == [
        ("gpu0@h", f"gpu.{fake_uuid(0)}", 2),
        ("gpu1@h", f"gpu.{fake_uuid(1)}", 2),
        ("gpuyard.jobs@h", "gpuyard.jobs", 2),
    ]
    cpu = workers[-1]
    assert cpu.gpu is None
    env = cpu.env({"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"})
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["GPUYARD_WORKER_GPU"] == "cpu" and env["PATH"] == "/bin"
    assert cpu.argv("INFO")[cpu.argv("INFO").index("--queues") + 1] == "gpuyard.jobs"
    assert plan_workers(FakeBackend("2x16GiB", tmp_path), "1", 1, cpu_queue="q")[-1].queue == "q"
    # No GPU: nothing to plan (the caller runs one CPU worker itself).
    assert plan_workers(FakeBackend("1x1GiB", tmp_path), "all", 1, cpu_queue="q")[0].gpu is not None
    assert plan_workers(_NoGpus(), "all", 1, cpu_queue="q") == []


class _NoGpus:
    def devices(self) -> list[Any]:
        return []


def test_worker_command_plans_gpu_and_cpu_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from cli.main import main
    from core.settings import get_settings

    def check(*args: str, fake: str = "2x16GiB") -> tuple[int, list[str], str]:
        monkeypatch.setenv("GPUYARD_FAKE_GPUS", fake)
        monkeypatch.setenv("GPUYARD_DATA_DIR", str(tmp_path))
        get_settings.cache_clear()
        try:
            result = CliRunner().invoke(main, ["worker", *args, "--check"])
        finally:
            get_settings.cache_clear()
        queues = [line.split("--queues ")[1].split()[0] for line in result.stdout.splitlines()]
        return result.exit_code, queues, result.output

    train_queue, notify = Settings(data_dir=tmp_path).train_queue, Settings(data_dir=tmp_path).notify_queue
    gpu0, gpu1 = f"gpu.{fake_uuid(0)},{notify}", f"gpu.{fake_uuid(1)},{notify}"  # every worker sends notifications
    assert check("--gpus", "all")[:2] == (0, [gpu0, gpu1, f"{train_queue},{notify}"])
    assert check("--gpus", "all", "--no-cpu-worker")[:2] == (0, [gpu0, gpu1])
    assert check("--gpus", "all", fake="")[:2] == (0, [f"{train_queue},{notify}"])  # no GPU: one CPU worker
    code, _, output = check("--gpus", "all", "--no-cpu-worker", fake="")
    assert code == 1 and "nothing else to run" in output
    code, _, output = check("--gpus", "all", "--expect-gpus", "1")
    assert code == 1 and "Expected exactly 1 GPU(s)" in output and "Received: 2" in output
    assert check("--gpus", "1", "--expect-gpus", "1")[:2] == (0, [gpu1, f"{train_queue},{notify}"])
    assert check("--no-cpu-worker")[0] == 2  # needs --gpus
    assert check("--gpu", fake_uuid(0), "--queue", "q")[0] == 2


def test_heartbeat_marks_processes_gpuyard_or_foreign(tmp_path: Path) -> None:
    backend = FakeBackend("1x16GiB", tmp_path)
    uuid = fake_uuid(0)
    declare_fake_process(tmp_path, uuid, os.getpid(), 2 * GiB)
    foreign = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        declare_fake_process(tmp_path, uuid, foreign.pid, 5 * GiB)
        beat = heartbeat(backend.device(uuid), host="h", worker="gpu0@h", slots=2, ours={os.getpid()})
        assert (beat["gpuyard_bytes"], beat["foreign_bytes"], beat["slots"]) == (2 * GiB, 5 * GiB, 2)
        assert {p["pid"]: p["gpuyard"] for p in beat["processes"]} == {os.getpid(): True, foreign.pid: False}
    finally:
        foreign.kill()
        foreign.wait()

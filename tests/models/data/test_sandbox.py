"""The sandboxed check: same answers as in-process, and a child that fails never takes the caller down."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import h5py
import pytest
from hostile import CASES, write_good

from core.errors import DataError
from core.settings import Settings
from models.data import sandbox
from models.data.inspect import inspect_file
from models.data.sandbox import check_file
from models.data.summary import DataKeys


def _codes(path: Path, **kwargs: object) -> list[str]:
    with pytest.raises(DataError) as info:
        check_file(path, **kwargs)  # type: ignore[arg-type]
    return [p.code for p in info.value.problems]


def test_good_file_gives_the_in_process_summary(tmp_path: Path) -> None:
    path = write_good(tmp_path / "good.h5", val=True)
    assert check_file(path) == inspect_file(path)


@pytest.mark.parametrize(
    "name", ["external_link", "nan_late", "declared_4tb", "truncated", "label_out_of_range"]
)
def test_hostile_files_come_back_with_all_their_problems(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    path = case.build(tmp_path)
    keys, limits = DataKeys(**case.keys), Settings(**case.limits)
    with pytest.raises(DataError) as in_process:
        inspect_file(path, keys, limits=limits)
    with pytest.raises(DataError) as sandboxed:
        check_file(path, keys, limits=limits)
    assert sandboxed.value.problems == in_process.value.problems


def test_child_sets_its_rlimits_and_loads_no_framework(tmp_path: Path) -> None:
    path = write_good(tmp_path / "good.h5")
    limits = Settings(validate_memory_bytes=900 * 2**20, validate_cpu_seconds=7)
    request = {"path": str(path), "keys": {}, "limits": {n: getattr(limits, n) for n in sandbox.CHILD_LIMITS}}
    started = time.monotonic()
    reply = sandbox.run_child(request, timeout_s=60)
    assert time.monotonic() - started < 15  # no Keras/TensorFlow import (that alone takes seconds)
    assert reply["ok"], reply
    rlimits = reply["child"]["rlimits"]
    assert rlimits["RLIMIT_AS"][0] == 900 * 2**20
    assert rlimits["RLIMIT_CPU"][0] == 7
    assert rlimits["RLIMIT_CORE"] == [0, 0]
    assert rlimits["RLIMIT_FSIZE"][0] <= 2**20
    assert reply["child"]["frameworks"] == []


def test_memory_limit_becomes_validator_memory_limit(tmp_path: Path) -> None:
    path = tmp_path / "big_chunks.h5"
    with h5py.File(path, "w") as f:  # 512 MiB declared, nothing stored: reading it allocates the full slice
        f.create_dataset("X_train", shape=(2**25, 4), dtype="f4", chunks=(2**16, 4))
        f.create_dataset("Y_train", shape=(2**25,), dtype="i1", chunks=(2**16,))
    limits = Settings(
        validate_memory_bytes=320 * 2**20,
        scan_slice_bytes=2**30,
        max_declared_bytes_unchecked=2**30,
    )
    assert _codes(path, limits=limits) == ["validator_memory_limit"]


def test_crashing_child_becomes_validator_crashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_good(tmp_path / "good.h5")
    monkeypatch.setattr(
        sandbox, "_child_command", lambda: [sys.executable, "-c", "import os; os.kill(os.getpid(), 11)"]
    )
    with pytest.raises(DataError) as info:
        check_file(path)
    (problem,) = info.value.problems
    assert problem.code == "validator_crashed" and "SIGSEGV" in problem.detail and "good.h5" in problem.detail


def test_cpu_limit_becomes_validator_time_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_good(tmp_path / "good.h5")
    spin = "import resource; resource.setrlimit(resource.RLIMIT_CPU, (1, 3))\nwhile True: pass"
    monkeypatch.setattr(sandbox, "_child_command", lambda: [sys.executable, "-c", spin])
    assert _codes(path, limits=Settings(validate_cpu_seconds=1)) == ["validator_time_limit"]


def test_wall_timeout_becomes_validator_time_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_good(tmp_path / "good.h5")
    monkeypatch.setattr(
        sandbox, "_child_command", lambda: [sys.executable, "-c", "import time; time.sleep(30)"]
    )
    assert _codes(path, timeout_s=1.0) == ["validator_time_limit"]


def test_garbage_from_the_child_becomes_validator_crashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_good(tmp_path / "good.h5")
    script = "import sys; print('{not json'); sys.exit(3)"
    monkeypatch.setattr(sandbox, "_child_command", lambda: [sys.executable, "-c", script])
    assert _codes(path) == ["validator_crashed"]

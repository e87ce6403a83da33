"""Fixtures every test package shares: the digits data set as HDF5, and one private redis-server.

The Redis server is ours alone (a free loopback port, no persistence, stopped after the session), so no
test ever touches — or flushes — another Redis's data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from support import free_port, wait_for


def pytest_configure(config: pytest.Config) -> None:
    """The suite's trainers checkpoint and probe after every epoch (the resume, cancel and health tests
    read them per epoch); tests of the elapsed-time and sampled defaults set these back themselves.
    Every Settings built here, and every trainer and worker started with this environment, sees them."""
    os.environ.setdefault("GPUYARD_CHECKPOINT_SECONDS", "0")
    os.environ.setdefault("GPUYARD_DIAGNOSTICS_SHARE", "1")


@pytest.fixture(scope="session")
def digits_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's digits (1 438 train, 359 test rows, 64 features) as gpuyard's HDF5 layout."""
    from models.data.digits import write_digits_h5  # imports scikit-learn: only for the tests that use it

    return write_digits_h5(tmp_path_factory.mktemp("data") / "digits.h5")


@pytest.fixture(scope="session")
def digits_image_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same digits as 8×8×1 images."""
    from models.data.digits import write_digits_h5  # imports scikit-learn: only for the tests that use it

    return write_digits_h5(tmp_path_factory.mktemp("data") / "digits_image.h5", image=True)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of our own on a free loopback port, for the whole session."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not on PATH (make test installs it)")
    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir)]  # fmt: skip
    with (workdir / "redis.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    try:
        wait_for(up, 10, "redis-server to answer PING", poll_s=0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

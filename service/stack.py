"""The whole local stack in one process tree (``gpuyard up``): Redis, the API, one worker, the janitor.

::

    gpuyard up ─┬─ redis-server   private, on a free loopback port (unless GPUYARD_REDIS_URL is set)
                ├─ gunicorn       service.app:create_app(), gevent workers
                ├─ gpuyard worker --gpus all: one worker per GPU (gpu.<uuid>) and one on the CPU queue, or
                │                 one CPU worker without GPUs (prefork; each trainer in its own process group)
                └─ gpuyard janitor

Everything lives under the data directory: ``gpuyard.db`` (SQLite), ``storage/``, ``redis/``, ``logs/``
and ``admin-token`` (mode 0600). The children run in their own sessions, so a Ctrl-C reaches only
``gpuyard up``, which stops them in order: SIGTERM to every descendant but Redis, SIGKILL after the
grace period, then Redis. ``gpuyard up`` is a child subreaper on Linux, so a trainer orphaned by its
worker comes back to it and is stopped too; every child also gets SIGTERM if ``gpuyard up`` dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil
import redis
import requests

from core.errors import GpuyardError
from core.settings import Settings
from store import Database
from store.errors import SchemaBehind, UserExists
from worker.procs import set_parent_death_signal

ADMIN_NAME = "admin"
# A child that dies is started again after _BACKOFF_FIRST_S, doubling to _BACKOFF_MAX_S; one that then runs
# for _STABLE_S starts from the first delay again.
_BACKOFF_FIRST_S = 1.0
_BACKOFF_MAX_S = 30.0
_STABLE_S = 60.0
ADMIN_TOKEN_FILE = "admin-token"
_PR_SET_CHILD_SUBREAPER = 36

REDIS_MISSING = (
    "redis-server is not installed (it is not on PATH). Install it with\n"
    "    sudo apt-get install redis-server     # Debian, Ubuntu\n"
    "    brew install redis                    # macOS\n"
    "or point GPUYARD_REDIS_URL at a Redis server you run yourself."
)


class StackError(GpuyardError):
    """The local stack could not start (port taken, Redis missing, a child exited, not ready in time)."""

    code = "stack_error"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def gunicorn_argv(host: str, port: int, workers: int, extra: Sequence[str] = ()) -> list[str]:
    """The gunicorn command serving the API: ``-c python:service.gunicorn_conf "service.app:create_app()"``
    (gevent workers: an idle event stream costs a greenlet, not a thread; see service/gunicorn_conf.py)."""
    return [
        sys.executable, "-m", "gunicorn",
        "-c", "python:service.gunicorn_conf", "--workers", str(workers),
        "--bind", f"{host}:{port}",
        *extra,
        "service.app:create_app()",
    ]  # fmt: skip


def worker_argv(gpus: str = "all", concurrency: int | None = None) -> list[str]:
    """The ``gpuyard worker`` arguments that serve every GPU of this host and its CPU queue (one CPU worker
    without GPUs): what ``gpuyard up`` runs."""
    return ["worker", "--gpus", gpus, *(["--concurrency", str(concurrency)] if concurrency else [])]


def gpuyard_argv(*args: str) -> list[str]:
    """A ``gpuyard`` subcommand run with this interpreter (whether or not the script is on PATH)."""
    script = Path(sys.executable).with_name("gpuyard")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), *args]
    return [sys.executable, "-c", "import sys; from cli.main import main; sys.exit(main())", *args]


def read_admin_token(data_dir: Path) -> str | None:
    path = data_dir / ADMIN_TOKEN_FILE
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def ensure_admin(db: Database, data_dir: Path) -> tuple[str | None, bool]:
    """The admin's token, creating the admin user and ``<data_dir>/admin-token`` (0600) on first start.

    Returns:
        (token, created). The token is None when the user exists but its token file was lost: only the
        token's hash is stored, so it cannot be shown again (create another user instead).
    """
    token = read_admin_token(data_dir)
    if token is not None and db.user_for_token(token) is not None:
        return token, False
    try:
        _, token = db.create_user(ADMIN_NAME, is_admin=True)
    except UserExists:
        return None, False
    path = data_dir / ADMIN_TOKEN_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return token, True


@dataclass
class Child:
    """One process of the stack, with its log file and what it takes to start it again."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0


@dataclass
class StackConfig:
    """What ``gpuyard up`` starts, and where.

    Args:
        data_dir: the stack's folder (DB, storage, Redis files, logs, admin token).
        host, port: where the API listens.
        api_workers: gunicorn worker processes.
        worker_concurrency: jobs run at once per GPU and on the CPU; None: GPUYARD_GPU_SLOTS (4) per GPU,
            packed by memory fraction, and 1 on the CPU.
        redis_url: an existing Redis to use; None starts a private redis-server on a free port.
        grace_s: seconds the children get after SIGTERM before SIGKILL.
        ready_timeout_s: seconds to wait for ``/v1/ready``.
    """

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    api_workers: int = 2
    worker_concurrency: int | None = None
    redis_url: str | None = None
    grace_s: float = 10.0
    ready_timeout_s: float = 60.0
    base_env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"


class Stack:
    """Starts and stops the local stack's processes. Use :meth:`start`, then :meth:`wait`, then :meth:`stop`.

    Args:
        config: what to start.
        say: where progress lines go (``print`` by default).
    """

    def __init__(self, config: StackConfig, say: Callable[[str], None] = print) -> None:
        self.config = config
        self.say = say
        self.data_dir = config.data_dir.resolve()
        self.children: list[Child] = []
        self.redis: Child | None = None
        self.redis_url = config.redis_url or ""
        self.settings: Settings | None = None
        self.admin_token: str | None = None
        self.admin_created = False
        self._logs: list[IO[bytes]] = []

    # ── start ──
    def start(self, stopping: Callable[[], bool] = lambda: False) -> None:
        """Start everything and wait until ``/v1/ready`` answers 200.

        Raises:
            StackError: what could not start, with the tail of its log.
        """
        config = self.config
        if not port_is_free(config.host, config.port):
            raise StackError(
                f"port {config.port} on {config.host} is already in use; pick another with --port "
                "(or stop what listens there)"
            )
        for sub in ("logs", "storage", "redis"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        # The API processes' metrics files (prometheus-client's multiprocess mode): a fresh set per start.
        shutil.rmtree(self.data_dir / "prometheus", ignore_errors=True)
        (self.data_dir / "prometheus").mkdir()
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

        if not self.redis_url:
            self._start_redis(stopping)
        self.settings = Settings(data_dir=self.data_dir, redis_url=self.redis_url)
        db = Database(self.settings.database_url)
        try:
            db.ensure_schema()
            self.admin_token, self.admin_created = ensure_admin(db, self.data_dir)
        except SchemaBehind as exc:
            raise StackError(f"{exc}: `gpuyard db upgrade --data-dir {self.data_dir}`") from exc
        finally:
            db.dispose()

        env = self._child_env()
        self._spawn(
            "api",
            gunicorn_argv(config.host, config.port, config.api_workers, extra=["--graceful-timeout", "5"]),
            env,
        )
        self._spawn("worker", gpuyard_argv(*worker_argv("all", config.worker_concurrency)), env)
        self._spawn("janitor", gpuyard_argv("janitor"), env)
        self._wait_ready(stopping)

    def _start_redis(self, stopping: Callable[[], bool]) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise StackError(REDIS_MISSING)
        port = free_port()
        argv = [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.data_dir / "redis"),
            "--save", "", "--appendonly", "yes",  # queued messages survive a restart of the stack
        ]  # fmt: skip
        self.redis = self._spawn("redis", argv, dict(self.config.base_env), track=False)
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1)
        try:
            deadline = time.monotonic() + 15
            while True:
                self._check_alive([self.redis])
                if stopping():
                    raise KeyboardInterrupt
                try:
                    client.ping()
                    return
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise StackError(
                            "redis-server did not answer PING within 15 s" + self._tail(self.redis)
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def _child_env(self) -> dict[str, str]:
        assert self.settings is not None
        env = dict(self.config.base_env)
        env.update(
            GPUYARD_DATA_DIR=str(self.data_dir),
            GPUYARD_DATABASE_URL=self.settings.database_url,
            GPUYARD_STORAGE_DIR=str(Path(self.settings.storage_dir or self.data_dir / "storage").resolve()),
            GPUYARD_REDIS_URL=self.redis_url,
            GPUYARD_WORKER_GPU=env.get("GPUYARD_WORKER_GPU", "cpu"),
            PROMETHEUS_MULTIPROC_DIR=str(self.data_dir / "prometheus"),  # GET /metrics sums the API processes
            PYTHONUNBUFFERED="1",
        )
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], *, track: bool = True) -> Child:
        log_path = self.data_dir / "logs" / f"{name}.log"
        log = log_path.open("ab")
        self._logs.append(log)
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.data_dir,
            start_new_session=True,  # Ctrl-C reaches `gpuyard up` only; it stops the children in order
            preexec_fn=set_parent_death_signal,  # and they go if `gpuyard up` is killed
        )
        child = Child(name, process, log_path, argv=list(argv), env=dict(env))
        if track:
            self.children.append(child)
        return child

    def _restart(self, child: Child) -> None:
        """Start a child that died again, in place, with its own argv and environment."""
        fresh = self._spawn(child.name, child.argv, child.env, track=False)
        child.process, child.started_at = fresh.process, fresh.started_at

    def _wait_ready(self, stopping: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.config.ready_timeout_s
        last = "no answer yet"
        while True:
            self._check_alive(self.all_children())
            if stopping():
                raise KeyboardInterrupt
            try:
                response = requests.get(self.config.url + "/v1/ready", timeout=2)
                if response.status_code == 200:
                    return
                last = f"{response.status_code}: {response.text.strip()[:300]}"
            except requests.RequestException as exc:
                last = type(exc).__name__
            if time.monotonic() > deadline:
                api = next(c for c in self.children if c.name == "api")
                raise StackError(
                    f"the API did not become ready within {self.config.ready_timeout_s:.0f} s ({last})"
                    + self._tail(api)
                )
            time.sleep(0.2)

    # ── run ──
    def all_children(self) -> list[Child]:
        return ([self.redis] if self.redis else []) + self.children

    def _check_alive(self, children: list[Child]) -> None:
        for child in children:
            code = child.process.poll()
            if code is not None:
                raise StackError(f"{child.name} exited with code {code}" + self._tail(child))

    def wait(self, stopping: Callable[[], bool], poll_s: float = 0.5) -> None:
        """Return when ``stopping()`` is true. A child that exits on its own is started again after a
        backoff (1 s, doubling up to 30 s; back to 1 s once it has run for a minute), and said so."""
        due: dict[str, float] = {}
        while not stopping():
            now = time.monotonic()
            for child in self.all_children():
                code = child.process.poll()
                if code is None:
                    if now - child.started_at > _STABLE_S:
                        child.restarts = 0
                    continue
                if child.name not in due:
                    delay = min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2**child.restarts)
                    due[child.name] = now + delay
                    note = f"{child.name} exited with code {code}; restarting it in {delay:.0f} s"
                    self.say(note + self._tail(child))
                elif now >= due[child.name]:
                    del due[child.name]
                    child.restarts += 1
                    self._restart(child)
                    self.say(f"{child.name} restarted (pid {child.process.pid}, restart {child.restarts})")
            self._reap_orphans()
            time.sleep(poll_s)

    def _reap_orphans(self) -> None:
        """Wait for exited descendants that were re-parented to us (we are their subreaper)."""
        ours = {c.process.pid for c in self.all_children()}
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process().children():
                if proc.pid not in ours:
                    with contextlib.suppress(ChildProcessError, OSError):
                        os.waitpid(proc.pid, os.WNOHANG)

    # ── stop ──
    def stop(self) -> None:
        """SIGTERM every descendant but Redis, SIGKILL what is left after the grace period, then Redis."""
        redis_pid = self.redis.process.pid if self.redis else None
        self._terminate_tree(exclude={redis_pid} if redis_pid else set())
        if self.redis is not None:
            self._terminate_tree(exclude=set())
        for log in self._logs:
            log.close()
        self._logs.clear()

    def _terminate_tree(self, exclude: set[int]) -> None:
        def targets() -> list[psutil.Process]:
            try:
                found = psutil.Process().children(recursive=True)
            except psutil.Error:
                return []
            return [p for p in found if p.pid not in exclude and _alive(p)]

        procs = targets()
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        deadline = time.monotonic() + self.config.grace_s
        while time.monotonic() < deadline:
            self._reap_all(exclude)
            procs = targets()
            if not procs:
                return
            time.sleep(0.1)
        for proc in targets():
            with contextlib.suppress(psutil.Error):
                self.say(
                    f"{self._name_of(proc.pid)} (pid {proc.pid}) did not stop in {self.config.grace_s:.0f} s: killed"
                )
                proc.kill()
        deadline = time.monotonic() + 5
        while targets() and time.monotonic() < deadline:
            self._reap_all(exclude)
            time.sleep(0.05)
        self._reap_all(exclude)

    def _reap_all(self, exclude: set[int]) -> None:
        for child in self.all_children():
            if child.process.pid not in exclude:
                child.process.poll()
        ours = {c.process.pid for c in self.all_children()}
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process().children():
                if proc.pid not in ours and proc.pid not in exclude:
                    with contextlib.suppress(ChildProcessError, OSError):
                        os.waitpid(proc.pid, os.WNOHANG)

    def _name_of(self, pid: int) -> str:
        for child in self.all_children():
            if child.process.pid == pid:
                return child.name
        return "process"

    @staticmethod
    def _tail(child: Child, lines: int = 20) -> str:
        try:
            text = child.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"\n--- last lines of {child.log_path} ---\n" + "\n".join(text) if text else ""


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False

"""Job event streams (SSE) that cost nothing while they wait, and a cap on how many one user opens.

Each open stream registers with its process's :class:`EventHub` and sleeps. The hub's single listener
(a greenlet under gunicorn's gevent worker, a thread elsewhere) is subscribed to the supervisors' Redis
pub/sub channels (``worker.relay.EVENTS_PATTERN``); a message for a job wakes that job's streams, which
then read the new events from the job DB — the DB stays the record, pub/sub only says "look now". While
Redis is unreachable the streams poll the DB every ``sse_poll_interval_s`` instead.

:class:`StreamSlots` counts each user's open streams across every API process (a Redis sorted set per
user whose members expire unless refreshed, so a killed process's streams age out); past the cap a new
stream is refused with 429 and ``Retry-After``. Without Redis it counts in this process only.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator

import redis

from worker.relay import EVENTS_PATTERN, job_of_channel

log = logging.getLogger(__name__)

_RETRY_S = 1.0


class EventHub:
    """Wakes the streams of a job when its supervisor publishes an event (one Redis subscription per process).

    Args:
        redis_url: the broker; None or empty: no hub, every wait falls back to polling.
        poll_s: how long a wait lasts while the subscription is not live (the DB is polled that often).
    """

    def __init__(self, redis_url: str | None, poll_s: float) -> None:
        self.redis_url = redis_url or None
        self.poll_s = poll_s
        self.live = threading.Event()
        self._lock = threading.Lock()
        self._watchers: dict[str, set[threading.Event]] = defaultdict(set)
        self._listener: threading.Thread | None = None
        self._closing = threading.Event()

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[threading.Event]:
        """An event set whenever ``job_id`` publishes; clear it BEFORE reading the DB, so nothing is missed."""
        self._start()
        flag = threading.Event()
        with self._lock:
            self._watchers[job_id].add(flag)
        try:
            yield flag
        finally:
            with self._lock:
                self._watchers[job_id].discard(flag)
                if not self._watchers[job_id]:
                    del self._watchers[job_id]

    def wait(self, flag: threading.Event, timeout_s: float) -> bool:
        """Sleep until ``flag`` is set or ``timeout_s`` passes (``poll_s`` at most while Redis is down)."""
        return flag.wait(timeout_s if self.live.is_set() else min(timeout_s, self.poll_s))

    def watching(self) -> int:
        """How many streams wait on this hub now."""
        with self._lock:
            return sum(len(flags) for flags in self._watchers.values())

    def close(self) -> None:
        self._closing.set()

    def _start(self) -> None:
        if self.redis_url is None or self._listener is not None:
            return
        with self._lock:
            if self._listener is None:
                self._listener = threading.Thread(target=self._listen, name="gpuyard-event-hub", daemon=True)
                self._listener.start()

    def _listen(self) -> None:
        assert self.redis_url is not None  # started only with a broker (listen_for)
        warned = False
        while not self._closing.is_set():
            client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2, health_check_interval=30)
            pubsub = client.pubsub()
            try:
                pubsub.psubscribe(EVENTS_PATTERN)
                # Live only once Redis confirmed the subscription: an event published after that wakes us.
                confirmed = pubsub.get_message(timeout=5.0)
                if not confirmed or confirmed.get("type") != "psubscribe":
                    raise redis.ConnectionError(f"no confirmation of the subscription ({confirmed!r})")
                self._wake_all()  # events published while we were not listening; before streams rely on us
                self.live.set()
                warned = False
                while not self._closing.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "pmessage":
                        self._wake(job_of_channel(message["channel"]))
            except (redis.RedisError, OSError) as exc:
                if not warned:
                    log.warning("event hub: Redis unreachable (%s); streams poll the job DB until it is back", exc)
                    warned = True
            finally:
                self.live.clear()
                with contextlib.suppress(redis.RedisError, OSError):
                    pubsub.close()
                    client.close()
            self._closing.wait(_RETRY_S)

    def _wake(self, job_id: str | None) -> None:
        if job_id is None:
            return
        with self._lock:
            flags = list(self._watchers.get(job_id, ()))
        for flag in flags:
            flag.set()

    def _wake_all(self) -> None:
        with self._lock:
            flags = [flag for group in self._watchers.values() for flag in group]
        for flag in flags:
            flag.set()


# Atomic across API processes: drop expired members, refuse past the cap, else add this stream.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class StreamSlots:
    """At most ``cap`` open event streams per user, counted across processes in Redis.

    Args:
        redis_url: the broker (None: count in this process only).
        cap: streams one user may hold open.
        ttl_s: a slot not refreshed for this long is free again (the stream's process died).
    """

    def __init__(self, redis_url: str | None, cap: int, ttl_s: float) -> None:
        self.cap, self.ttl_s = cap, ttl_s
        self._client = (
            redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2) if redis_url else None
        )
        self._acquire = self._client.register_script(_ACQUIRE) if self._client is not None else None
        self._local: dict[int, int] = defaultdict(int)
        self._lock = threading.Lock()

    @staticmethod
    def _key(user_id: int) -> str:
        return f"gpuyard:streams:{user_id}"

    def acquire(self, user_id: int) -> str | None:
        """A slot for a new stream, or None when the user holds ``cap`` already."""
        slot = uuid.uuid4().hex
        if self._acquire is not None:
            now = time.time()
            try:
                ok = self._acquire(
                    keys=[self._key(user_id)],
                    args=[now, now + self.ttl_s, self.cap, slot, int(self.ttl_s) + 60],
                )
                return slot if ok else None
            except redis.RedisError as exc:
                log.warning("stream slots: Redis unreachable (%s); counting in this process", exc)
        with self._lock:
            if self._local[user_id] >= self.cap:
                return None
            self._local[user_id] += 1
        return "local:" + slot

    def refresh(self, user_id: int, slot: str) -> None:
        """Keep a long-lived stream's slot from expiring."""
        if self._client is None or slot.startswith("local:"):
            return
        with contextlib.suppress(redis.RedisError):
            self._client.zadd(self._key(user_id), {slot: time.time() + self.ttl_s}, xx=True)

    def release(self, user_id: int, slot: str) -> None:
        if slot.startswith("local:"):
            with self._lock:
                self._local[user_id] = max(0, self._local[user_id] - 1)
            return
        if self._client is not None:
            with contextlib.suppress(redis.RedisError):
                self._client.zrem(self._key(user_id), slot)

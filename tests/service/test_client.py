"""The Python client and the ``gpuyard`` client commands, against the API served over real HTTP.

The app is the test app of ``conftest.py`` (temporary SQLite DB and storage, a fake queue, a fake dry
run) served by werkzeug's threaded server on a free port; a few tests use a hand-written stub server to
drop an event stream halfway or to send a wrong checksum.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from api_helpers import GOOD_SPEC, Tokens, free_port, services
from click.testing import CliRunner
from flask import Flask

from cli.main import main
from core.names import TRAINER_LOG as JOB_LOG_NAME
from core.settings import get_settings
from service.client import Client, ClientError, SseParser


@pytest.fixture
def dataset_id(alice: Client, digits_h5: Path) -> str:
    return alice.upload_dataset(digits_h5)["id"]


def _job_events(epochs: int = 2, final: str = "succeeded") -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [
        {"event": "state", "state": "running", "attempt": 1, "gpu": "cpu"},
        {"event": "started", "epochs": epochs, "backend": "tensorflow"},
    ]
    for epoch in range(1, epochs + 1):
        events += [
            {"event": "epoch_start", "epoch": epoch, "epochs": epochs, "steps": 10},
            {"event": "batch", "epoch": epoch, "step": 5, "steps": 10, "loss": 0.5, "samples_per_s": 99.0,
             "eta_s": 3.0},
            {"event": "epoch_end", "epoch": epoch, "epochs": epochs, "loss": 0.25, "metrics": {"accuracy": 0.875},
             "samples_per_s": 1234.0, "eta_s": 1.0},
        ]  # fmt: skip
    if final == "succeeded":
        events.append(
            {
                "event": "finished",
                "epochs_completed": epochs,
                "metrics": {"train": {"accuracy": 0.99, "loss": 0.01}, "val": None, "test": {"accuracy": 0.97}},
            }
        )
    else:
        events.append({"event": "failed", "reason": "out_of_memory", "detail": "the trainer ran out of memory"})
    events.append({"event": "state", "state": final, **({"reason": "out_of_memory"} if final == "failed" else {})})
    return events


# ── data sets ─────────────────────────────────────────────────────────────────────────────────────────
def test_upload_streams_the_file_and_lists_it(alice: Client, digits_h5: Path) -> None:
    first = alice.upload_dataset(digits_h5, name="digits")
    again = alice.upload_dataset(digits_h5)

    assert first["sha256"] == hashlib.sha256(digits_h5.read_bytes()).hexdigest()
    assert first["size_bytes"] == digits_h5.stat().st_size
    assert again["id"] == first["id"]  # same bytes, same data set
    assert [d["id"] for d in alice.list_datasets()] == [first["id"]]
    assert alice.dataset(first["id"])["name"] == "digits"


def test_refused_upload_carries_every_problem(alice: Client, tmp_path: Path) -> None:
    bogus = tmp_path / "not.h5"
    bogus.write_bytes(b"this is not HDF5" * 10)

    with pytest.raises(ClientError) as caught:
        alice.upload_dataset(bogus)

    assert caught.value.status_code == 422
    assert caught.value.error == "dataset_invalid"
    assert caught.value.problems_raw and all("detail" in p for p in caught.value.problems_raw)


# ── errors ────────────────────────────────────────────────────────────────────────────────────────────
def test_api_errors_become_client_errors_with_the_body(alice: Client, dataset_id: str, server_url: str) -> None:
    with pytest.raises(ClientError) as unauthorized:
        Client(server_url, "gy_not-a-token").list_datasets()
    assert (unauthorized.value.status_code, unauthorized.value.error) == (401, "unauthorized")
    assert "token" in unauthorized.value.detail

    with pytest.raises(ClientError) as invalid:
        alice.submit(dataset_id, {"architecture": {"family": "highway", "depth": -1}, "training": {"epochs": 0}})
    assert invalid.value.status_code == 422
    assert invalid.value.error == "spec_invalid"
    fields = {p.get("field") for p in invalid.value.problems_raw}
    assert any(f and f.startswith("spec.") for f in fields), fields

    with pytest.raises(ClientError) as missing:
        alice.job("job_doesnotexist")
    assert (missing.value.status_code, missing.value.error) == (404, "not_found")
    assert missing.value.to_dict()["detail"] == missing.value.detail


def test_unreachable_api_is_a_client_error_not_a_requests_one() -> None:
    client = Client(f"http://127.0.0.1:{free_port()}", "token", timeout_s=2)
    with pytest.raises(ClientError) as caught:
        client.health()
    assert caught.value.status_code is None
    assert caught.value.error == "connection_failed"

    with pytest.raises(ClientError, match="http:// or https://"):
        Client("127.0.0.1:8000")


# ── jobs ──────────────────────────────────────────────────────────────────────────────────────────────
def test_submit_list_show_cancel(alice: Client, dataset_id: str, queue: Any, dry_run: Any) -> None:
    report = alice.submit(dataset_id, GOOD_SPEC, dry_run=True)
    assert report["dry_run"] is True and report["report"]["parameters"] == 1234
    assert queue.sent == []

    job = alice.submit(dataset_id, GOOD_SPEC)
    assert job["state"] == "queued" and queue.sent == [job["id"]]
    assert [j["id"] for j in alice.jobs(state="queued")] == [job["id"]]
    assert alice.jobs(state="running") == []
    assert alice.job(job["id"])["dataset"] == dataset_id

    assert alice.cancel(job["id"])["state"] == "cancelled"


def test_jobs_follows_every_page(alice: Client, dataset_id: str, app: Flask) -> None:
    db = services(app).db
    owner = db.user_for_token(alice.session.headers["Authorization"].split()[1])
    assert owner is not None
    created = [db.create_job(owner.id, dataset_id, GOOD_SPEC, max_active=100, max_attempts=1).id for _ in range(5)]
    assert sorted(j["id"] for j in alice.jobs(limit=2)) == sorted(created)


# ── events ────────────────────────────────────────────────────────────────────────────────────────────
def test_events_replay_then_follow_until_the_terminal_event(alice: Client, dataset_id: str, app: Flask) -> None:
    db = services(app).db
    job_id = alice.submit(dataset_id, GOOD_SPEC)["id"]
    script = _job_events()
    for event in script[:3]:
        db.append_event(job_id, event)

    def later() -> None:
        for event in script[3:]:
            time.sleep(0.02)
            db.append_event(job_id, event)

    writer = threading.Thread(target=later)
    writer.start()
    received = list(alice.events(job_id))
    writer.join()

    # The job DB's own "queued" state event comes first; then ours, in order, numbered 2, 3, ...
    assert received[0].json() == {"event": "state", "state": "queued", "time": received[0].json()["time"]}
    assert [e.event for e in received[1:]] == [e["event"] for e in script]
    assert [e.id for e in received] == [str(n) for n in range(1, len(script) + 2)]
    assert received[-1].is_terminal and received[-1].json()["state"] == "succeeded"
    assert received[4].event == "batch" and received[4].json()["loss"] == 0.5

    total = len(received)
    resumed = list(alice.events(job_id, last_event_id=total - 2))
    assert [e.id for e in resumed] == [str(total - 1), str(total)]


def test_events_of_a_finished_job_end_without_waiting(alice: Client, dataset_id: str) -> None:
    job_id = alice.submit(dataset_id, GOOD_SPEC)["id"]
    alice.cancel(job_id)
    started = time.monotonic()
    received = list(alice.events(job_id))
    assert received[-1].is_terminal and received[-1].json()["state"] == "cancelled"
    assert list(alice.events(job_id, last_event_id=received[-1].id)) == []
    assert time.monotonic() - started < 5


def test_events_of_someone_elses_job_is_404(alice: Client, dataset_id: str, server_url: str, tokens: Tokens) -> None:
    job_id = alice.submit(dataset_id, GOOD_SPEC)["id"]
    with pytest.raises(ClientError) as caught:
        next(Client(server_url, tokens.bob).events(job_id))
    assert caught.value.status_code == 404


class _StubApi(BaseHTTPRequestHandler):
    """Event stream that breaks off in the middle of event 2 the first time, and a bad-checksum artifact."""

    protocol_version = "HTTP/1.1"
    seen_last_event_ids: list[str | None] = []  # noqa: RUF012  (reset per test)

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.endswith("/events"):
            self._events()
        elif self.path.endswith("/artifacts/model.h5"):
            body = b"model bytes"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", '"' + "0" * 64 + '"')
            self.end_headers()
            self.wfile.write(body)
        else:
            body = json.dumps({"id": "job_x", "state": "running"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def _events(self) -> None:
        last = self.headers.get("Last-Event-ID")
        self.seen_last_event_ids.append(last)
        one = b'id: 1\nevent: started\ndata: {"event":"started"}\n\n'
        two = b'id: 2\nevent: epoch_end\ndata: {"event":"epoch_end","epoch":1}\n\n'
        three = b'id: 3\r\nevent: state\r\ndata: {"event":"state",\r\ndata: "state":"failed"}\r\n\r\n'
        if last is None:  # chunked, then the connection dies halfway through event 2
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for chunk in (b"retry: 10\n\n: keep-alive\n\n" + one, two[:20]):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
            self.close_connection = True
            return
        # The reconnect: a body delimited by the connection's close (HTTP/1.0 style).
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(two + three)
        self.close_connection = True


@pytest.fixture
def stub_url() -> Iterator[str]:
    _StubApi.seen_last_event_ids = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(5)


def test_events_reconnect_with_last_event_id_after_a_drop(stub_url: str) -> None:
    received = list(Client(stub_url, "t", timeout_s=5).events("job_x"))

    assert [(e.id, e.event) for e in received] == [("1", "started"), ("2", "epoch_end"), ("3", "state")]
    assert received[2].json() == {"event": "state", "state": "failed"}  # two data lines joined
    assert received[2].is_terminal
    assert _StubApi.seen_last_event_ids == [None, "1"]


def test_sse_parser_follows_the_spec() -> None:
    parser = SseParser()
    stream = b": comment\r\nid: 7\r\nevent: batch\r\ndata: a\r\ndata:b\r\n\r\nid: 8\n\ndata: plain\r\r"
    events = []
    for i in range(len(stream)):  # one byte at a time: CRLF split across feeds, partial lines
        events += parser.feed(stream[i : i + 1])
    assert [(e.id, e.event, e.data) for e in events] == [("7", "batch", "a\nb"), ("8", "message", "plain")]
    assert parser.last_event_id == "8"


# ── logs and artifacts ────────────────────────────────────────────────────────────────────────────────
def _job_with_files(alice: Client, dataset_id: str, app: Flask, files: dict[str, bytes]) -> str:
    job_id = alice.submit(dataset_id, GOOD_SPEC)["id"]
    storage = services(app).storage
    for name, data in files.items():
        path = storage.local_path(storage.job_key(job_id, name))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return job_id


def test_download_is_verified_and_atomic(alice: Client, dataset_id: str, app: Flask, tmp_path: Path) -> None:
    model = bytes(range(256)) * 5000
    job_id = _job_with_files(alice, dataset_id, app, {"model.h5": model, JOB_LOG_NAME: b"epoch 1\nepoch 2\n"})

    written = alice.download(job_id, "model.h5", tmp_path / "out" / "m.h5")
    assert written.read_bytes() == model
    into_folder = alice.download(job_id, "model.h5", tmp_path)
    assert into_folder == tmp_path / "model.h5" and into_folder.read_bytes() == model
    assert alice.logs(job_id) == "epoch 1\nepoch 2\n"

    with pytest.raises(ClientError) as caught:
        alice.download(job_id, "model.keras", tmp_path / "none.keras")
    assert caught.value.status_code == 404
    assert not (tmp_path / "none.keras").exists()


def test_download_with_a_wrong_checksum_writes_nothing(stub_url: str, tmp_path: Path) -> None:
    with pytest.raises(ClientError) as caught:
        Client(stub_url, "t").download("job_x", "model.h5", tmp_path / "model.h5")
    assert caught.value.error == "checksum_mismatch"
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


# ── the gpuyard commands ──────────────────────────────────────────────────────────────────────────────
def _cli(args: list[str], url: str, token: str) -> Any:
    return CliRunner().invoke(main, [*args, "--url", url, "--token", token], catch_exceptions=False)


def test_cli_upload_submit_status_download(
    server_url: str, tokens: Tokens, digits_h5: Path, tmp_path: Path, app: Flask
) -> None:
    uploaded = _cli(["datasets", "upload", str(digits_h5)], server_url, tokens.alice)
    assert uploaded.exit_code == 0, uploaded.output
    dataset_id = uploaded.stdout.strip().splitlines()[-1]
    assert dataset_id.startswith("ds_")
    listed = _cli(["datasets", "list"], server_url, tokens.alice)
    assert dataset_id in listed.stdout

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(GOOD_SPEC))
    dry = _cli(["submit", "--dataset", dataset_id, str(spec), "--dry-run"], server_url, tokens.alice)
    assert dry.exit_code == 0 and "1234" in dry.stdout
    submitted = _cli(["submit", "--dataset", dataset_id, str(spec)], server_url, tokens.alice)
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip().splitlines()[-1]

    status = _cli(["status"], server_url, tokens.alice)
    assert job_id in status.stdout and "queued" in status.stdout
    one = _cli(["status", job_id, "--json"], server_url, tokens.alice)
    assert json.loads(one.stdout)["id"] == job_id

    storage = services(app).storage
    path = storage.local_path(storage.job_key(job_id, "history.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[]")
    out = tmp_path / "h.json"
    got = _cli(["download", job_id, "--artifact", "history.json", "-o", str(out)], server_url, tokens.alice)
    assert got.exit_code == 0 and out.read_text() == "[]"

    cancelled = _cli(["cancel", job_id], server_url, tokens.alice)
    assert "cancelled" in cancelled.stdout


def test_cli_errors_name_the_problem(server_url: str, tokens: Tokens, digits_h5: Path, tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text("{not json")
    bad_json = _cli(["submit", "--dataset", "ds_x", str(spec)], server_url, tokens.alice)
    assert bad_json.exit_code == 2 and "not valid JSON" in bad_json.output

    spec.write_text(json.dumps({"architecture": {"family": "nope"}}))
    refused = _cli(["submit", "--dataset", "ds_x", str(spec)], server_url, tokens.alice)
    assert refused.exit_code == 1
    assert "422 spec_invalid" in refused.output and "  - " in refused.output

    unauthorized = _cli(["status"], server_url, "gy_wrong")
    assert unauthorized.exit_code == 1 and "401 unauthorized" in unauthorized.output


@pytest.mark.parametrize(("final", "exit_code"), [("succeeded", 0), ("failed", 1)])
def test_cli_logs_follow_shows_progress_and_exits_by_state(
    final: str, exit_code: int, alice: Client, dataset_id: str, app: Flask, tokens: Tokens, server_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    job_id = alice.submit(dataset_id, GOOD_SPEC)["id"]
    for event in _job_events(final=final):
        services(app).db.append_event(job_id, event)
    monkeypatch.setenv("GPUYARD_URL", server_url)  # the URL and token from the environment this time
    monkeypatch.setenv("GPUYARD_TOKEN", tokens.alice)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(main, ["logs", "-f", job_id], catch_exceptions=False)
    finally:
        get_settings.cache_clear()

    assert result.exit_code == exit_code, result.output
    assert "epoch 1/2  loss 0.2500  accuracy 0.8750  1,234 samples/s" in result.output
    assert "epoch 2/2" in result.output
    assert f"job {final}" in result.output
    if final == "failed":
        assert "out_of_memory" in result.output
    else:
        assert (
            "finished after 2 epochs: train accuracy 0.9900, train loss 0.0100, test accuracy 0.9700" in result.output
        )


def test_cli_logs_prints_the_trainer_log(
    alice: Client, dataset_id: str, app: Flask, tokens: Tokens, server_url: str
) -> None:
    job_id = _job_with_files(alice, dataset_id, app, {JOB_LOG_NAME: b"hello from the trainer\n"})
    result = _cli(["logs", job_id], server_url, tokens.alice)
    assert result.exit_code == 0 and result.stdout == "hello from the trainer\n"


def test_a_succeeded_job_still_shows(alice: Client, dataset_id: str, app: Flask) -> None:
    from worker.relay import progress_of as _progress_of

    job_id = alice.submit(dataset_id, GOOD_SPEC)["id"]
    finished = {"event": "finished", "metrics": {"train": {"accuracy": 0.99}, "val": None, "test": {"loss": 0.1}}}
    db = services(app).db
    assert db.take_lease(job_id, "test-owner", 60) is not None
    assert db.record_progress(job_id, _progress_of(finished) or {})  # what the supervisor stores
    assert alice.job(job_id)["id"] == job_id
    assert [j["id"] for j in alice.jobs()] == [job_id]

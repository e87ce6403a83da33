"""``gpuyard tensorboard JOB…``: each job's tensorboard.zip downloaded through the API and unpacked by job id."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from api_helpers import GOOD_SPEC, Tokens, services
from click.testing import CliRunner
from flask import Flask

from cli.main import main
from cli.tensorboard import logdir_spec
from core.names import TENSORBOARD_ZIP
from service.client import Client


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _job_with_logs(alice: Client, app: Flask, digits_h5: Path, files: dict[str, bytes]) -> str:
    dataset = alice.upload_dataset(digits_h5)["id"]
    job_id = alice.submit(dataset, GOOD_SPEC)["id"]
    storage = services(app).storage
    path = storage.local_path(storage.job_key(job_id, TENSORBOARD_ZIP))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_zip(files))
    return job_id


def test_tensorboard_downloads_and_unpacks_each_job(
    alice: Client, server_url: str, tokens: Tokens, app: Flask, digits_h5: Path, tmp_path: Path
) -> None:
    """About a second: two jobs with stand-in event files, one without logs."""
    first = _job_with_logs(alice, app, digits_h5, {"events.out.tfevents.1.a": b"first"})
    second = _job_with_logs(alice, app, digits_h5, {"events.out.tfevents.2.b": b"second", "../escape": b"x"})
    cache = tmp_path / "cache"
    (cache / first).mkdir(parents=True)
    (cache / first / "stale").write_text("from an older download")

    result = CliRunner().invoke(
        main,
        [
            "tensorboard",
            first,
            second,
            "--dir",
            str(cache),
            "--no-launch",
            "--url",
            server_url,
            "--token",
            tokens.alice,
        ],
    )

    assert result.exit_code == 0, result.output
    assert (cache / first / "events.out.tfevents.1.a").read_bytes() == b"first"
    assert not (cache / first / "stale").exists()  # replaced whole
    assert (cache / second / "events.out.tfevents.2.b").read_bytes() == b"second"
    assert not (cache / "escape").exists() and not (tmp_path / "escape").exists()
    assert f"{first}\t{cache / first}" in result.stdout
    assert (
        logdir_spec({first: cache / first, second: cache / second})
        == f"{first}:{cache / first},{second}:{cache / second}"
    )


def test_tensorboard_names_a_job_without_logs(
    alice: Client, server_url: str, tokens: Tokens, digits_h5: Path, tmp_path: Path
) -> None:
    job_id = alice.submit(alice.upload_dataset(digits_h5)["id"], GOOD_SPEC)["id"]
    result = CliRunner().invoke(
        main,
        ["tensorboard", job_id, "--dir", str(tmp_path), "--no-launch", "--url", server_url, "--token", tokens.alice],
    )
    assert result.exit_code != 0
    assert f"no {TENSORBOARD_ZIP}" in result.output and job_id in result.output
    assert not (tmp_path / job_id).exists()
    escape = CliRunner().invoke(
        main, ["tensorboard", "../x", "--dir", str(tmp_path), "--url", server_url, "--token", tokens.alice]
    )
    assert escape.exit_code == 2 and "Expected a job id" in escape.output

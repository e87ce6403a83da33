"""``gpuyard tensorboard JOB [JOB…]``: download jobs' TensorBoard logs and open TensorBoard on them."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import click

from cli.jobs import client_options
from core.names import TENSORBOARD_ZIP
from service.client import Client

_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # a job id names a folder here: no separators, no dots


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/gpuyard/tensorboard`` (``~/.cache/…`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpuyard" / "tensorboard"


def fetch_logs(client: Client, job_ids: Sequence[str], cache_dir: Path) -> dict[str, Path]:
    """Download each job's ``tensorboard.zip`` and unpack it into ``cache_dir/<job id>/`` (replaced whole).

    Returns:
        Job id → its log folder, in the order given.

    Raises:
        ClientError: a job has no logs (404) or the download failed; nothing of that job is unpacked.
        click.ClickException: an archive is not a zip file.
    """
    for job_id in job_ids:
        if not _JOB_ID.match(job_id):
            raise click.BadParameter(
                f"Expected a job id such as job_k3v9x2m7qpta. Received: {job_id!r}", param_hint="JOBS"
            )
    cache_dir.mkdir(parents=True, exist_ok=True)
    folders: dict[str, Path] = {}
    for job_id in job_ids:
        target = cache_dir / job_id
        with tempfile.TemporaryDirectory(prefix=f".{job_id}.", dir=cache_dir) as staging:
            archive = client.download(job_id, TENSORBOARD_ZIP, Path(staging) / TENSORBOARD_ZIP)
            unpacked = Path(staging) / "logs"
            try:
                with zipfile.ZipFile(archive) as zipped:
                    zipped.extractall(unpacked)  # extractall drops absolute paths and '..' from member names
            except zipfile.BadZipFile as exc:
                raise click.ClickException(f"{TENSORBOARD_ZIP} of job {job_id} is not a zip file: {exc}") from exc
            if target.exists():
                shutil.rmtree(target)
            unpacked.rename(target)
        folders[job_id] = target
    return folders


def logdir_spec(folders: dict[str, Path]) -> str:
    """TensorBoard's ``--logdir_spec``: ``name:path`` pairs, each job's runs named by its id."""
    return ",".join(f"{job_id}:{path}" for job_id, path in folders.items())


@click.command("tensorboard")
@click.argument("jobs", nargs=-1, required=True)
@click.option(
    "--dir",
    "cache_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the logs are unpacked, one folder per job. Default: ~/.cache/gpuyard/tensorboard.",
)
@click.option("--port", type=int, default=6006, show_default=True, help="TensorBoard's port.")
@click.option("--no-launch", is_flag=True, help="Only download and unpack; print the folders.")
@client_options
def tensorboard_command(
    client: Client, jobs: tuple[str, ...], cache_dir: Path | None, port: int, no_launch: bool
) -> None:
    """Download the TensorBoard logs of JOBS and run ``tensorboard`` on them (when it is installed)."""
    folders = fetch_logs(client, jobs, cache_dir or default_cache_dir())
    for job_id, folder in folders.items():
        click.echo(f"{job_id}\t{folder}")
    spec = logdir_spec(folders)
    executable = shutil.which("tensorboard")
    if no_launch:
        return
    if executable is None:
        click.echo(
            "tensorboard is not installed here (pip install tensorboard); then run:\n"
            f"  tensorboard --logdir_spec {spec}",
            err=True,
        )
        return
    argv = [executable, "--logdir_spec", spec, "--port", str(port)]
    click.echo(" ".join(argv), err=True)
    os.execv(executable, argv)  # TensorBoard takes over this process (Ctrl-C ends it)

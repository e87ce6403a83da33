"""The ``gpuyard`` commands that use a succeeded job's model: evaluate, predict, export (run by a worker).

Each sends one operation to the API, waits for the worker to finish it (``--timeout``), and prints its
result; ``--json`` prints the whole operation instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cli.jobs import client_options
from core.names import EXPORT_ARTIFACTS, EXPORT_FORMATS
from service.client import Client

_TIMEOUT = click.option(
    "--timeout", "timeout_s", type=float, default=600.0, show_default=True, help="Seconds to wait for the worker."
)
_JSON = click.option("--json", "as_json", is_flag=True, help="Print the whole operation as JSON.")


@click.command("evaluate")
@click.argument("job")
@click.argument("dataset")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True)
@_TIMEOUT
@_JSON
@client_options
def evaluate(client: Client, job: str, dataset: str, split: str, timeout_s: float, as_json: bool) -> None:
    """Measure JOB's model on DATASET (an uploaded data set's id): its loss and metrics."""
    operation = client.evaluate(job, dataset, split=split, timeout_s=timeout_s)
    if as_json:
        _print_json(operation)
        return
    result = operation["result"]
    click.echo(f"{job} on {dataset} ({result['split']}, {result['rows']} rows):")
    for name, value in result["metrics"].items():
        click.echo(f"  {name}: {value:.6g}" if isinstance(value, int | float) else f"  {name}: {value}")


@click.command("predict")
@click.argument("job")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the result as JSON here.")
@_TIMEOUT
@_JSON
@client_options
def predict(client: Client, job: str, file: Path, output: Path | None, timeout_s: float, as_json: bool) -> None:
    """Predict with JOB's model: FILE is JSON ({"inputs": [[...], ...]} or a list of rows) or HDF5 with X."""
    inputs: Any = file
    if file.suffix.lower() == ".json":
        try:
            loaded = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"{file} is not readable JSON ({exc})", param_hint="FILE") from exc
        inputs = loaded.get("inputs") if isinstance(loaded, dict) else loaded
        if not isinstance(inputs, list):
            raise click.BadParameter(
                f'{file}: expected {{"inputs": [[...], ...]}} or a list of rows', param_hint="FILE"
            )
    operation = client.predict(job, inputs, timeout_s=timeout_s)
    if output is not None:
        output.write_text(json.dumps(operation["result"]))
        click.echo(str(output))
    elif as_json:
        _print_json(operation)
    else:
        _print_json(operation["result"])


@click.command("export")
@click.argument("job")
@click.option(
    "--format",
    "formats",
    type=click.Choice(EXPORT_FORMATS),
    multiple=True,
    default=("onnx",),
    show_default=True,
    help="Repeat for several.",
)
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), help="Download the files here.")
@_TIMEOUT
@client_options
def export(client: Client, job: str, formats: tuple[str, ...], output: Path | None, timeout_s: float) -> None:
    """Export JOB's model (ONNX, SavedModel) as artifacts; with -o, download them."""
    client.export(job, list(formats), timeout_s=timeout_s)
    for fmt in formats:
        name = EXPORT_ARTIFACTS[fmt]
        if output is not None:
            output.mkdir(parents=True, exist_ok=True)
            click.echo(str(client.download(job, name, output / name)))
        else:
            click.echo(f"{name}: gpuyard download {job} --artifact {name}")


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=1))

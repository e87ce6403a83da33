"""``gpuyard demo``: train the course's Highway network on the digits data with the standalone trainer."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
from rich.console import Console

from cli.render import render_events
from core.exitcodes import ExitCode
from core.names import MODEL_H5
from core.settings import get_settings
from core.trainer import trainer_argv
from models.data.digits import write_digits_h5

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "specs"


def _json_lines(stream: Iterator[str]) -> Iterator[dict]:
    for line in stream:
        line = line.strip()
        if line.startswith("{"):
            yield json.loads(line)


@click.command("demo")
@click.option(
    "--spec",
    "spec_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=EXAMPLES / "highway.json",
    show_default=True,
    help="Job spec to train.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output directory [default: <data dir>/demo/run].",
)
@click.option(
    "--backend",
    type=click.Choice(["tensorflow", "jax", "torch"]),
    default=None,
    help="Keras backend [default: the spec's].",
)
def demo_command(spec_path: Path, out_dir: Path | None, backend: str | None) -> None:
    """Train SPEC (the Highway example by default) on sklearn's digits, written as HDF5, on the CPU."""
    console = Console(stderr=True)
    demo_dir = get_settings().data_dir / "demo"
    data_path = write_digits_h5(demo_dir / "digits.h5")
    out_dir = out_dir or demo_dir / "run"
    console.print(f"data: {data_path}\nspec: {spec_path}\nout:  {out_dir}")
    command = trainer_argv(spec=spec_path, data=data_path, out=out_dir, gpu="cpu", backend=backend or None)
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        last = render_events(_json_lines(proc.stdout), console).last
        for _ in proc.stdout:  # drain whatever follows the terminal event
            pass
    code = ExitCode(proc.returncode) if proc.returncode in ExitCode._value2member_map_ else ExitCode.INTERNAL_ERROR
    if code is not ExitCode.SUCCEEDED:
        raise click.ClickException(f"training ended with exit code {proc.returncode} ({code.reason})")
    metrics = (last or {}).get("metrics", {})
    test = metrics.get("test", {}) if isinstance(metrics, dict) else {}
    console.print(f"[green]done[/green]: test metrics {json.dumps(test)}")
    console.print(f"model: {out_dir / MODEL_H5}  (loads with keras.models.load_model)")

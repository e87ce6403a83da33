"""``gpuyard check-data``: check an HDF5 data set in the sandbox, as an upload is checked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from pydantic import ValidationError

from core.errors import DataError
from core.settings import get_settings
from models.data.sandbox import check_file
from models.data.summary import DataKeys

_KEY_OPTIONS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


@click.command("check-data")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--keys-json", help='Keys as JSON, e.g. \'{"x_train": "X", "y_train": "Y", "num_classes": 10}\'.')
@click.option("--x-train", help="Key of the training inputs (default X_train).")
@click.option("--y-train", help="Key of the training targets (default Y_train).")
@click.option("--x-val", help="Key of the validation inputs (default X_val, optional in the file).")
@click.option("--y-val", help="Key of the validation targets (default Y_val).")
@click.option("--x-test", help="Key of the test inputs (default X_test, optional in the file).")
@click.option("--y-test", help="Key of the test targets (default Y_test).")
@click.option("--num-classes", type=int, help="Declared number of classes; labels must lie in [0, N).")
@click.option("--timeout", "timeout_s", type=float, help="Wall-clock limit of the check in seconds.")
def check_data(
    file: Path,
    keys_json: str | None,
    num_classes: int | None,
    timeout_s: float | None,
    **key_options: str | None,
) -> None:
    """Check an HDF5 data set in a sandboxed process; print its summary as JSON.

    Exits 0 with the summary on stdout, or 2 with {"error": "dataset_invalid", "problems": [...]} on stdout
    and one line per reason on stderr.
    """
    keys = _keys(keys_json, num_classes, key_options)
    try:
        summary = check_file(file, keys, limits=get_settings(), timeout_s=timeout_s)
    except DataError as exc:
        click.echo(json.dumps(exc.to_dict(), indent=2))
        for problem in exc.problems:
            where = f" [{problem.field}]" if problem.field else ""
            click.echo(f"{problem.code}{where}: {problem.detail}", err=True)
        sys.exit(2)
    click.echo(summary.model_dump_json(indent=2))


def _keys(keys_json: str | None, num_classes: int | None, key_options: dict[str, str | None]) -> DataKeys:
    """DataKeys from --keys-json, then the single-key options on top; a bad value is a usage error."""
    try:
        base = json.loads(keys_json) if keys_json else {}
    except ValueError as exc:
        raise click.BadParameter(
            f"expected a JSON object, received {keys_json!r} ({exc})", param_hint="--keys-json"
        ) from None
    if not isinstance(base, dict):
        raise click.BadParameter(f"expected a JSON object, received {keys_json!r}", param_hint="--keys-json")
    base.update({name: value for name, value in key_options.items() if name in _KEY_OPTIONS and value})
    if num_classes is not None:
        base["num_classes"] = num_classes
    try:
        return DataKeys.model_validate(base)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']} (received {e.get('input')!r})" for e in exc.errors()
        )
        raise click.BadParameter(reasons, param_hint="--keys-json/--num-classes") from None

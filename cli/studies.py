"""``gpuyard study``: create a study from a YAML or JSON file, follow its trials, download its best model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import yaml
from rich.console import Console
from rich.live import Live
from rich.table import Table

from cli.jobs import client_options
from cli.render import styled_state
from core.names import MODEL_H5
from service.client import Client


@click.group("study")
def study() -> None:
    """Studies: many trials of one spec over a search space, run as jobs (docs/studies.md)."""


@study.command("create")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Check every trial and show the count and first placements only.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@client_options
def create(client: Client, file: Path, dry_run: bool, as_json: bool) -> None:
    """Submit the study in FILE (.yaml, .yml or .json): name, dataset, spec, space, objective, sampler, ..."""
    body = _read(file)
    out = client.create_study(body, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    if dry_run:
        click.echo(f"{out['trials']} trials, {out['max_parallel']} at a time; {out['checked']} trial specs checked")
        largest = out.get("largest") or {}
        if largest:
            click.echo(
                f"largest trial: {_params(largest['params'])}: {largest['parameters']:,} parameters, "
                f"~{largest['training_bytes'] / 2**20:,.1f} MiB per training step"
            )
        for index, placement in enumerate(out["first"]):
            where = placement.get("gpu") or f"waits ({placement.get('waiting_reason')})"
            click.echo(f"  trial {index}: {where}")
        return
    click.echo(out["id"])


def _read(file: Path) -> dict[str, Any]:
    text = file.read_text()
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"{file} is not valid {'JSON' if file.suffix == '.json' else 'YAML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise click.BadParameter(f"Expected {file} to hold one object (the study). Received: {type(data).__name__}")
    return data


@study.command("status")
@click.argument("study_id", required=False)
@click.option("--watch", is_flag=True, help="Refresh every 2 s until the study ends.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@client_options
def status(client: Client, study_id: str | None, watch: bool, as_json: bool) -> None:
    """Show STUDY_ID's trials (params, state, objective, reason), or list your studies."""
    if study_id is None:
        studies = client.studies()
        if as_json:
            click.echo(json.dumps(studies, indent=2))
            return
        table = Table("id", "name", "state", "trials", "best")
        for item in studies:
            best = item.get("best") or {}
            counts = ", ".join(f"{n} {s}" for s, n in sorted(item["counts"].items()))
            table.add_row(item["id"], item["name"], item["state"], counts, _value(best.get("value")))
        Console().print(table)
        return
    found = client.study(study_id)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not watch:
        Console().print(study_table(found))
        return
    with Live(study_table(found), refresh_per_second=1) as live:
        while found["finished_at"] is None:
            time.sleep(2)
            found = client.study(study_id)
            live.update(study_table(found))


def study_table(found: dict[str, Any]) -> Table:
    """The trials of one study as a table, with the best one marked."""
    objective = found["objective"]
    best = (found.get("best") or {}).get("number")
    title = (
        f"{found['name']} ({found['id']}): {found['state']}, {found['sampler']} sampler, {found['pruner']} pruner; "
        f"{objective['direction']} {objective['metric']}"
    )
    table = Table("#", "state", "params", objective["metric"], "reason", "job", title=title)
    for trial in found.get("trials") or []:
        mark = " ★" if trial["number"] == best else ""
        table.add_row(
            f"{trial['number']}{mark}",
            styled_state(trial["state"]),
            _params(trial["params"]),
            _value(trial.get("value")),
            trial.get("reason") or "",
            trial.get("job") or "",
        )
    return table


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{path}={json.dumps(value)[:40]}" for path, value in params.items())


def _value(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


@study.command("best")
@click.argument("study_id")
@click.option(
    "--download", "directory", type=click.Path(file_okay=False, path_type=Path), help="Download its model.h5 here."
)
@client_options
def best(client: Client, study_id: str, directory: Path | None) -> None:
    """Show the best succeeded trial of STUDY_ID; with --download DIR, save its model.h5 in DIR."""
    found = client.study(study_id)
    top = found.get("best")
    if not top:
        raise click.ClickException(f"study {study_id} has no succeeded trial yet")
    click.echo(f"trial {top['number']} ({top['job']}): {found['objective']['metric']} {_value(top['value'])}")
    click.echo(f"  {_params(top['params'])}")
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        click.echo(str(client.download_best(study_id, directory / MODEL_H5)))


@study.command("cancel")
@click.argument("study_id")
@client_options
def cancel(client: Client, study_id: str) -> None:
    """Cancel STUDY_ID: no new trials; queued trials cancelled, running ones stopped."""
    click.echo(client.cancel_study(study_id)["state"])

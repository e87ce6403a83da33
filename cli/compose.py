"""``gpuyard compose``: write a docker compose override with one worker service per GPU of a host.

The base ``docker-compose.yml`` runs ``worker-gpu0`` and ``worker-gpu1``. The override keeps those whose
device is asked for, adds a service for every other device (a copy of the base's GPU worker, pinned to
that device), and moves the base workers whose device is not asked for into the ``unused-gpu`` profile,
so ``docker compose up`` leaves them alone (an override can add to a service, never remove it).
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pynvml
import yaml

from core.atomicio import atomic_write_bytes

DEFAULT_BASE = Path("docker-compose.yml")
DEFAULT_OUTPUT = Path("docker-compose.gpus.yml")
UNUSED_PROFILE = "unused-gpu"

_INDEX = re.compile(r"^[0-9]+$")
_UUID = re.compile(r"^GPU-[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")


class NoNvidiaDriver(click.ClickException):
    """``--gpus all`` on a host where NVML cannot be loaded: no driver, or no GPU."""


@dataclass(frozen=True)
class Gpu:
    """One GPU as NVML numbers it on this host."""

    index: int
    uuid: str
    name: str


def host_gpus() -> list[Gpu]:
    """Every GPU NVML sees on this host, in NVML (PCI bus) order.

    Raises:
        NoNvidiaDriver: NVML could not be initialised.
    """
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NoNvidiaDriver(
            f"no NVIDIA driver found on this host (NVML: {exc}). "
            "Name the GPUs instead: --gpus 0,1,2 (device ids) or --gpus 4 (a count)."
        ) from exc
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid, name = pynvml.nvmlDeviceGetUUID(handle), pynvml.nvmlDeviceGetName(handle)
            gpus.append(
                Gpu(
                    index=index,
                    uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                    name=name.decode() if isinstance(name, bytes) else name,
                )
            )
        return gpus
    except pynvml.NVMLError as exc:
        raise NoNvidiaDriver(f"NVML could not list this host's GPUs: {exc}") from exc
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def parse_gpus(value: str) -> list[str] | None:
    """Device ids from ``--gpus``: None for ``all``; ``N`` is a count (``0`` … ``N-1``); else a list.

    A list holds indices or GPU UUIDs, separated by commas (``3,`` is the list holding only GPU 3).

    Raises:
        click.BadParameter: an empty list, a count below 1, a malformed or repeated id.
    """
    text = value.strip()
    if text.lower() == "all":
        return None
    if _INDEX.match(text):
        count = int(text)
        if count < 1:
            raise click.BadParameter(f"Expected a count of at least 1. Received: {value!r}", param_hint="--gpus")
        return [str(index) for index in range(count)]
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids:
        raise click.BadParameter(
            f"Expected 'all', a count, or device ids like 0,1,2. Received: {value!r}", param_hint="--gpus"
        )
    for device_id in ids:
        if not (_INDEX.match(device_id) or _UUID.match(device_id)):
            raise click.BadParameter(
                f"Expected a GPU index (0, 1, …) or UUID (GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx). "
                f"Received: {device_id!r}",
                param_hint="--gpus",
            )
    normalised = [str(int(device_id)) if _INDEX.match(device_id) else device_id for device_id in ids]
    repeated = sorted({device_id for device_id in normalised if normalised.count(device_id) > 1})
    if repeated:
        raise click.BadParameter(
            f"Expected each GPU once (one worker per GPU). Received {', '.join(repeated)} more than once in {value!r}",
            param_hint="--gpus",
        )
    return normalised


def service_name(device_id: str) -> str:
    """``worker-gpu3`` for index 3, ``worker-gpu-5c1a2b3c`` for a UUID."""
    if _INDEX.match(device_id):
        return f"worker-gpu{device_id}"
    return f"worker-gpu-{device_id.removeprefix('GPU-')[:8].lower()}"


def nvidia_device_ids(service: dict[str, Any]) -> list[str]:
    """The device ids a service reserves from the nvidia driver (empty for a CPU service)."""
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [
        str(device_id)
        for device in devices
        if device.get("driver") == "nvidia"
        for device_id in device.get("device_ids", [])
    ]


def gpu_reservation(device_id: str) -> dict[str, Any]:
    """``deploy:`` pinning a service to one GPU (FACTS: ``count`` and ``device_ids`` are exclusive)."""
    return {
        "resources": {
            "reservations": {"devices": [{"driver": "nvidia", "device_ids": [device_id], "capabilities": ["gpu"]}]}
        }
    }


def gpu_override(base: dict[str, Any], device_ids: Sequence[str]) -> dict[str, Any]:
    """The override that leaves exactly one worker per device in ``device_ids`` active.

    Args:
        base: the base compose file, loaded (anchors resolved).
        device_ids: the devices to run workers on, by host index or UUID.

    Raises:
        click.ClickException: the base file has no GPU worker to copy.
    """
    services: dict[str, Any] = base.get("services") or {}
    base_workers = {name: ids for name, service in services.items() if (ids := nvidia_device_ids(service))}
    if not base_workers:
        raise click.ClickException("the base compose file has no GPU worker service (deploy.resources.reservations)")
    template = services[min(base_workers)]
    kept = {ids[0] for name, ids in base_workers.items() if len(ids) == 1 and service_name(ids[0]) == name}
    override: dict[str, Any] = {}
    for name, ids in sorted(base_workers.items()):
        if not (len(ids) == 1 and ids[0] in device_ids and name == service_name(ids[0])):
            override[name] = {"profiles": [UNUSED_PROFILE]}
    for device_id in device_ids:
        if device_id in kept:
            continue
        service = copy.deepcopy(template)
        service.pop("profiles", None)
        service["deploy"] = gpu_reservation(device_id)
        override[service_name(device_id)] = service
    return {"services": override}


class _PlainDumper(yaml.SafeDumper):
    """Writes shared values in full: an override cannot use the base file's anchors anyway."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_override(override: dict[str, Any], header_lines: Sequence[str]) -> str:
    """The override as YAML, under a comment header."""
    header = "".join(f"# {line}\n" if line else "#\n" for line in header_lines)
    body = yaml.dump(override, Dumper=_PlainDumper, sort_keys=False, default_flow_style=False, width=10_000)
    return header + "\n" + body


@click.command("compose")
@click.option(
    "--gpus",
    required=True,
    help="'all' (this host's GPUs, from NVML), device ids '0,1,2' (or GPU UUIDs), or a count N (0 … N-1).",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    default=DEFAULT_OUTPUT,
    show_default=True,
    help="Where to write the override ('-': standard output).",
)
@click.option(
    "--base",
    "base_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=DEFAULT_BASE,
    show_default=True,
    help="The compose file the override applies to; its GPU worker is the template.",
)
@click.option("--by-uuid", is_flag=True, help="With --gpus all: pin each worker by GPU UUID instead of index.")
def compose_command(gpus: str, output: Path, base_path: Path, by_uuid: bool) -> None:
    """Write a compose override with one worker service per GPU.

    Then: docker compose -f docker-compose.yml -f docker-compose.gpus.yml up -d
    """
    device_ids = parse_gpus(gpus)
    notes: list[str] = []
    if device_ids is None:
        found = host_gpus()
        if not found:
            raise NoNvidiaDriver("NVML found no GPU on this host. Name the GPUs instead: --gpus 0,1 or --gpus 2.")
        device_ids = [gpu.uuid if by_uuid else str(gpu.index) for gpu in found]
        notes = ["GPUs found by NVML on this host:", *(f"  {gpu.index}: {gpu.uuid} ({gpu.name})" for gpu in found)]
    elif by_uuid:
        raise click.BadParameter("--by-uuid needs --gpus all (NVML tells the UUIDs)", param_hint="--by-uuid")
    try:
        base = yaml.safe_load(base_path.read_text())
    except yaml.YAMLError as exc:
        raise click.ClickException(f"{base_path} is not valid YAML: {exc}") from exc
    if not isinstance(base, dict):
        raise click.ClickException(f"{base_path} is not a compose file (expected a mapping at the top)")
    override = gpu_override(base, device_ids)
    name = "docker-compose.gpus.yml" if str(output) == "-" else output.name
    text = render_override(
        override,
        [
            f"Generated by `gpuyard compose --gpus {gpus}{' --by-uuid' if by_uuid else ''}` from {base_path.name}:",
            f"one worker per GPU, on {', '.join(device_ids)}.",
            f"Use: docker compose -f {base_path.name} -f {name} up -d",
            f"Base workers in the '{UNUSED_PROFILE}' profile are left stopped.",
            *(["", *notes] if notes else []),
        ],
    )
    if str(output) == "-":
        click.echo(text, nl=False)
        return
    atomic_write_bytes(output, text.encode())
    click.echo(f"wrote {output}: workers on GPU {', '.join(device_ids)}", err=True)

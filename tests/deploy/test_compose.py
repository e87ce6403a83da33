"""Static checks of docker-compose.yml and .env.example: schema, commands, pinning, settings names."""

from __future__ import annotations

import importlib
import re
import shlex
from typing import Any

import click
import jsonschema
import pytest
from deploy_helpers import (
    COMPOSE_FILE,
    DOCKERFILES,
    ENV_EXAMPLE,
    ROOT,
    gpuyard_names,
    load_compose,
    settings_env_names,
    validate_compose,
)

from deploy.envdoc import COMPOSE_VARIABLES, settings_env_example
from deploy.gpu_worker import worker_argv
from deploy.healthcheck import CHECKS
from service.cli import main as gpuyard_cli
from worker.settings import Settings

COMPOSE = load_compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
GPUYARD_SERVICES = [name for name, service in SERVICES.items() if "deploy/Dockerfile" in str(service.get("build"))]
WORKERS = [name for name in SERVICES if name.startswith("worker-")]
GPU_WORKERS = [name for name in WORKERS if "devices" in str(SERVICES[name].get("deploy"))]
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


def test_validates_against_the_compose_specification() -> None:
    validate_compose(COMPOSE)


def test_schema_catches_a_mistake() -> None:
    # The schema is strict about service keys: a misspelt one fails, so the test above means something.
    broken = {"services": {"api": {"image": "x:1.0", "helthcheck": {"test": ["CMD", "true"]}}}}
    with pytest.raises(jsonschema.ValidationError, match="helthcheck"):
        validate_compose(broken)


def test_anchors_and_extension_fields_instead_of_copies() -> None:
    raw = COMPOSE_FILE.read_text()
    assert "&gpuyard-env" in raw and "<<:" in raw
    assert {"x-gpuyard-env", "x-worker"} <= set(COMPOSE)
    assert raw.count('deploy/healthcheck.py", "worker"') == 1, "one worker healthcheck, shared by anchor"


def test_the_services() -> None:
    assert {"redis", "postgres", "api", "janitor", "worker-gpu0", "worker-gpu1", "worker-cpu"} <= set(SERVICES)
    assert SERVICES["worker-cpu"]["profiles"] == ["cpu"]
    assert all("profiles" not in SERVICES[name] for name in SERVICES if name != "worker-cpu")


def test_broker_persists_and_postgres_keeps_its_data() -> None:
    redis = SERVICES["redis"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    postgres = SERVICES["postgres"]
    assert any(volume.endswith(":/var/lib/postgresql/data") for volume in postgres["volumes"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    named = set(COMPOSE["volumes"])
    for service in (redis, postgres):
        assert all(volume.split(":")[0] in named for volume in service["volumes"])


def test_third_party_images_are_pinned() -> None:
    for name in ("redis", "postgres"):
        image = SERVICES[name]["image"]
        assert re.fullmatch(r"[a-z0-9/._-]+:[0-9]+\.[0-9]+[A-Za-z0-9._-]*", image), f"{name}: {image!r} not pinned"


def test_each_gpu_worker_pins_a_different_device() -> None:
    assert len(GPU_WORKERS) >= 2
    seen: list[str] = []
    for name in GPU_WORKERS:
        (device,) = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert "count" not in device, "count and device_ids are exclusive"
        assert len(device["device_ids"]) == 1 and isinstance(device["device_ids"][0], str)
        seen.append(device["device_ids"][0])
        assert SERVICES[name]["build"]["dockerfile"] == "deploy/Dockerfile.gpu"
    assert len(set(seen)) == len(seen), f"two GPU workers share a device: {seen}"
    assert "deploy" not in SERVICES["worker-cpu"]


def test_storage_is_one_volume_shared_at_the_data_dir() -> None:
    for name in ["api", "janitor", *WORKERS]:
        service = SERVICES[name]
        assert "storage:/data" in service["volumes"], name
        env = service["environment"]
        assert env["GPUYARD_DATA_DIR"] == "/data" and env["GPUYARD_STORAGE_DIR"].startswith("/data/"), name


def test_every_service_has_a_healthcheck_and_waits_for_healthy_dependencies() -> None:
    for name, service in SERVICES.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert condition == {"condition": "service_healthy"}, f"{name} → {dependency}"
            assert SERVICES[dependency].get("healthcheck"), dependency
    for name in ["api", "janitor", *WORKERS]:
        assert {"redis", "postgres"} <= set(SERVICES[name]["depends_on"]), name


def test_healthchecks_run_a_real_check() -> None:
    for name in GPUYARD_SERVICES:
        probe = SERVICES[name]["healthcheck"]["test"]
        assert probe[:3] == ["CMD", "python", "deploy/healthcheck.py"], name
        assert probe[3] in CHECKS
        expected = "worker" if name.startswith("worker-") else name
        assert probe[3] == expected, name


def assert_gpuyard_command(argv: list[str]) -> None:
    """``gpuyard SUB [SUB...] ARGS``: each SUB is a command of its group and ARGS parse (nothing is run)."""
    assert argv[0] == "gpuyard"
    command: click.Command = gpuyard_cli
    context = click.Context(gpuyard_cli, info_name="gpuyard")
    args = list(argv[1:])
    while isinstance(command, click.Group):
        assert args, f"{argv}: {command.name} needs a subcommand"
        sub = command.commands.get(args[0])
        assert sub is not None, f"{argv}: {command.name} has no command {args[0]!r}"
        command, name, args = sub, args[0], args[1:]
        if not isinstance(command, click.Group):
            with context:
                command.make_context(name, args, parent=context)
        else:
            context = click.Context(command, info_name=name, parent=context)


def resolve_command(argv: list[str]) -> None:
    """Fail unless ``argv`` starts something that exists: a gpuyard command, gunicorn's app, a deploy script."""
    program = argv[0]
    if program == "gpuyard":
        assert_gpuyard_command(argv)
    elif program == "gunicorn":
        config = argv[argv.index("-c") + 1]
        assert (ROOT / config).is_file()
        module_name, _, call = argv[-1].partition(":")
        factory = getattr(importlib.import_module(module_name), call.removesuffix("()"))
        assert callable(factory) and call.endswith("()")
    elif program == "celery":
        module_name = argv[argv.index("-A") + 1]
        assert hasattr(importlib.import_module(module_name), "make_celery")
    elif program == "python":
        script = ROOT / argv[1]
        assert script.is_file() and script.parent.name == "deploy", argv
        if script.name == "gpu_worker.py":
            # What it execs once it knows its GPU.
            assert_gpuyard_command(worker_argv("GPU-" + "0" * 8 + "-0000-0000-0000-" + "0" * 12, "q", argv[2:]))
    else:
        pytest.fail(f"unknown program {program!r} in {argv}")


def test_every_command_resolves_to_a_real_entry_point() -> None:
    for name in GPUYARD_SERVICES:
        command = SERVICES[name]["command"]
        assert isinstance(command, list), f"{name}: use the exec form"
        resolve_command(command)
    assert SERVICES["worker-cpu"]["command"][:2] == ["gpuyard", "worker"]
    assert SERVICES["janitor"]["command"] == ["gpuyard", "janitor"]


def test_dockerfile_default_commands_resolve() -> None:
    from dockerfile_parser import read_stages

    for path in DOCKERFILES.values():
        resolve_command(read_stages(path)[-1].all("CMD")[-1].exec_form() or [])


def test_commands_in_the_deploy_docs_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # gpuyard compose's --base default is relative
    text = (ROOT / "docs" / "deploy.md").read_text()
    commands = re.findall(
        r"^\s*(?:\$ )?(?:docker compose exec (?:-T )?[a-z0-9-]+ )?((?:gpuyard|celery -A) [^\n#]*)", text, re.MULTILINE
    )
    assert len(commands) >= 8 and any(c.startswith("celery") for c in commands)
    for line in commands:
        argv = shlex.split(line.replace("\\", ""))
        if argv[0] == "celery":
            resolve_command(argv)
        elif "<" not in line:
            assert_gpuyard_command(argv)
        else:
            assert argv[1] in gpuyard_cli.commands, line


def test_every_gpuyard_name_is_a_setting() -> None:
    known = settings_env_names()
    for path in [COMPOSE_FILE, ENV_EXAMPLE, *DOCKERFILES.values(), *sorted((ROOT / "deploy").glob("*.py")),
                 ROOT / "docs" / "deploy.md"]:  # fmt: skip
        unknown = gpuyard_names(path.read_text()) - known
        assert not unknown, f"{path.relative_to(ROOT)}: no Settings field for {sorted(unknown)}"


def test_env_example_is_generated_from_settings() -> None:
    assert ENV_EXAMPLE.read_text() == settings_env_example(), "run: .venv/bin/python deploy/envdoc.py > .env.example"


def test_env_example_documents_every_setting_and_compose_variable() -> None:
    text = ENV_EXAMPLE.read_text()
    for name, field in Settings.model_fields.items():
        assert f"# GPUYARD_{name.upper()}=" in text
        assert (field.description or "").split()[0] in text
    documented = {name for name, _, _ in COMPOSE_VARIABLES} | settings_env_names()
    used = set(INTERPOLATION.findall(COMPOSE_FILE.read_text()))
    assert used <= documented, f"compose reads variables .env.example does not explain: {sorted(used - documented)}"

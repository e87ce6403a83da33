"""Static checks of docker-compose.yml and .env.example: schema, commands, pinning, settings names."""

from __future__ import annotations

import importlib
import re
import shlex
import tempfile
from typing import Any

import click
import jsonschema
import pytest
import yaml
from click.testing import CliRunner
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

from cli.main import main as gpuyard_cli
from core.settings import Settings, get_settings
from deploy.envdoc import COMPOSE_VARIABLES, settings_env_example
from deploy.healthcheck import CHECKS, api_health_url
from worker.gpus import fake_uuid

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
    assert SERVICES["prometheus"]["profiles"] == SERVICES["grafana"]["profiles"] == ["monitoring"]
    optional = {"worker-cpu", "prometheus", "grafana"}
    assert all("profiles" not in SERVICES[name] for name in SERVICES if name not in optional)


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
    for name in ("redis", "postgres", "prometheus", "grafana"):
        image = SERVICES[name]["image"]
        assert re.fullmatch(r"[a-z0-9/._-]+:v?[0-9]+\.[0-9]+[A-Za-z0-9._-]*", image), f"{name}: {image!r} not pinned"


def test_prometheus_scrapes_the_api_on_loopback_and_grafana_reads_it() -> None:
    prometheus = SERVICES["prometheus"]
    assert prometheus["network_mode"] == "service:api"  # loopback: GET /metrics needs no token there
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["127.0.0.1:8000"]
    sources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert sources["datasources"][0]["url"] == "http://api:9090"
    for volume in prometheus["volumes"] + SERVICES["grafana"]["volumes"]:
        source = volume.split(":")[0]
        assert source in COMPOSE["volumes"] or (ROOT / source).exists(), volume


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


def test_gpu_workers_share_the_hosts_pid_namespace() -> None:
    # NVML reports host pids: in its own pid namespace the watchdog would find none of its trainers and
    # the heartbeat would call gpuyard's own trainers foreign (worker/watchdog.py).
    for name in GPU_WORKERS:
        assert SERVICES[name].get("pid") == "host", name
        assert SERVICES[name]["environment"].get("TINI_SUBREAPER") == "1", f"{name}: init is not PID 1 there"
    for name in set(SERVICES) - set(GPU_WORKERS):
        assert "pid" not in SERVICES[name], f"{name} has no GPU: keep its own pid namespace"


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


def check_worker_command(argv: list[str], fake_gpus: str = "1x16GiB") -> tuple[int, str, list[list[str]]]:
    """Run ``gpuyard worker ... --check`` (parsing and the command's own validation, nothing started) where
    ``fake_gpus`` are the visible GPUs ('' for none): (exit code, output, each planned worker's command line).
    """
    assert argv[:2] == ["gpuyard", "worker"], argv
    with tempfile.TemporaryDirectory() as data_dir:
        env = {"GPUYARD_FAKE_GPUS": fake_gpus, "GPUYARD_DATA_DIR": data_dir, "GPUYARD_TRAIN_QUEUE": "cpu.jobs"}
        get_settings.cache_clear()
        try:
            result = CliRunner().invoke(gpuyard_cli, [*argv[1:], "--check"], env=env)
        finally:
            get_settings.cache_clear()
    lines = [shlex.split(line) for line in result.stdout.splitlines()]
    return result.exit_code, result.output, lines


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def assert_runs_one_gpu_worker(argv: list[str]) -> None:
    """On a container's one visible GPU, ``argv`` runs one worker pinned to that GPU, on gpu.<uuid>."""
    code, output, planned = check_worker_command(argv)
    assert code == 0, f"{argv}: {output}"
    (line,) = planned
    uuid = fake_uuid(0)
    assert f"CUDA_VISIBLE_DEVICES={uuid}" in line and f"GPUYARD_WORKER_GPU={uuid}" in line, line
    assert option(line, "--queues") == f"gpu.{uuid},gpuyard.notify", line
    assert option(line, "--hostname").startswith("gpu0@"), line


def resolve_command(argv: list[str]) -> None:
    """Fail unless ``argv`` starts something that exists and accepts its options: a gpuyard command (a
    worker's validated by ``--check``), gunicorn's app, a deploy script."""
    program = argv[0]
    if program == "gpuyard":
        assert_gpuyard_command(argv)
        if argv[1] == "worker":
            code, output, planned = check_worker_command(argv)
            assert code == 0 and planned, f"{argv}: {output}"
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
    else:
        pytest.fail(f"unknown program {program!r} in {argv}")


def test_every_command_resolves_to_a_real_entry_point() -> None:
    for name in GPUYARD_SERVICES:
        command = SERVICES[name]["command"]
        assert isinstance(command, list), f"{name}: use the exec form"
        resolve_command(command)
    assert SERVICES["worker-cpu"]["command"][:2] == ["gpuyard", "worker"]
    assert SERVICES["janitor"]["command"] == ["gpuyard", "janitor"]


def test_a_gpu_container_runs_one_worker_on_its_gpus_queue() -> None:
    # Inside a GPU worker's container exactly one GPU is visible: the command must pin a worker to it
    # and consume its own queue, gpu.<uuid>, where the dispatcher sends its jobs (worker/dispatch.py).
    for name in GPU_WORKERS:
        command = SERVICES[name]["command"]
        assert_runs_one_gpu_worker(command)
        # And it refuses to start rather than run on the wrong GPUs or on none.
        for visible in ("2x16GiB", ""):
            code, output, _ = check_worker_command(command, fake_gpus=visible)
            assert code != 0, f"{name} started with fake GPUs {visible!r}: {output}"


def test_the_gpu_image_runs_the_same_worker() -> None:
    from dockerfile_parser import read_stages

    command = read_stages(DOCKERFILES["gpu"])[-1].all("CMD")[-1].exec_form() or []
    assert_runs_one_gpu_worker(command)


def test_the_cpu_worker_consumes_the_cpu_queue() -> None:
    # CPU jobs go to GPUYARD_TRAIN_QUEUE; the GPU containers leave it to worker-cpu.
    for visible in ("", "1x16GiB"):
        code, output, planned = check_worker_command(SERVICES["worker-cpu"]["command"], fake_gpus=visible)
        assert code == 0, output
        assert [option(line, "--queues") for line in planned] == ["cpu.jobs,gpuyard.notify"], output
    assert "--no-cpu-worker" in SERVICES["worker-gpu0"]["command"]


def test_the_old_gpu_worker_command_fails_the_check() -> None:
    # What deploy/gpu_worker.py used to exec: --queue with a GPU is a usage error.
    code, _, _ = check_worker_command(["gpuyard", "worker", "--gpu", fake_uuid(0), "--queue", "gpuyard.jobs"])
    assert code == 2


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


# ---- the container test's override (deploy/compose.test.yml, run by `make compose-test`)


class _ComposeTagLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags: ``!reset`` (drop the base's value) and ``!override`` (replace it)."""


for _tag in ("!reset", "!override"):
    _ComposeTagLoader.add_constructor(
        _tag,
        lambda loader, node: loader.construct_sequence(node)
        if isinstance(node, yaml.SequenceNode)
        else loader.construct_mapping(node)
        if isinstance(node, yaml.MappingNode)
        else None,
    )


TEST_OVERRIDE = yaml.load((ROOT / "deploy" / "compose.test.yml").read_text(), Loader=_ComposeTagLoader)


def test_the_test_stack_stays_on_the_hosts_loopback() -> None:
    # Tests talk only to loopback: host networking (no bridge), no published ports, the API bound to 127.0.0.1.
    services = TEST_OVERRIDE["services"]
    assert set(services) == {"api", "janitor", "worker-cpu", "worker-b"}
    for name, service in services.items():
        assert service["network_mode"] == "host", name
        assert not service.get("ports"), name
        assert not service.get("depends_on", {}).keys() - {"api"}, f"{name} waits for no redis/postgres service"
    assert services["api"]["environment"]["GUNICORN_BIND"].startswith("127.0.0.1:")


def test_the_test_stack_has_two_hosts_sharing_only_storage() -> None:
    services = TEST_OVERRIDE["services"]
    a, b = services["worker-cpu"], services["worker-b"]
    assert a["hostname"] != b["hostname"], "two hosts: two Celery node names, two lease owners"
    assert b["extends"] == {"file": "docker-compose.yml", "service": "worker-cpu"}
    for worker in (a, b):
        assert worker["volumes"] == ["storage:/data/storage"], "only the storage volume is shared; /data is its own"
        assert worker["environment"]["GPUYARD_STORAGE_DIR"] == "/data/storage"


def test_the_api_healthcheck_follows_the_bind_address() -> None:
    assert api_health_url("0.0.0.0:8000") == "http://127.0.0.1:8000/v1/health"
    assert api_health_url("127.0.0.1:18123") == "http://127.0.0.1:18123/v1/health"

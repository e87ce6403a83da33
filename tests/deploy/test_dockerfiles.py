"""Static checks of deploy/Dockerfile.cpu and deploy/Dockerfile.gpu (no Docker engine runs here or in CI)."""

from __future__ import annotations

import re
import tomllib

import pytest
from deploy_helpers import DOCKERFILES, ROOT, dockerignored, gpuyard_names, settings_env_names
from dockerfile_parser import global_args, parse_dockerfile, read_stages, resolve_base, stages

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# A pinned tag names a version: python:3.11.11-slim-bookworm, nvidia/cuda:12.5.1-base-ubuntu24.04.
PINNED_TAG = re.compile(r"^[a-z0-9./_-]+:[0-9]+\.[0-9]+[A-Za-z0-9._-]*$")


# ---- the parser itself


def test_parser_joins_continuations_and_skips_comments() -> None:
    text = "# syntax=docker/dockerfile:1\nFROM a:1.0 AS one\nRUN x \\\n    # note\n    && y\n\nFROM b:2.0\nUSER u\n"
    instructions = parse_dockerfile(text)
    assert [(i.keyword, i.value, i.line) for i in instructions] == [
        ("FROM", "a:1.0 AS one", 2),
        ("RUN", "x && y", 3),
        ("FROM", "b:2.0", 7),
        ("USER", "u", 8),
    ]
    parsed = stages(instructions)
    assert [(s.base, s.name) for s in parsed] == [("a:1.0", "one"), ("b:2.0", None)]
    assert parsed[1].all("USER")[0].value == "u"


def test_parser_reads_build_arguments_of_from() -> None:
    instructions = parse_dockerfile("ARG BASE=a:1.0\nARG OTHER\nFROM ${BASE} AS one\nFROM $BASE\n")
    args = global_args(instructions)
    assert args == {"BASE": "a:1.0", "OTHER": None}
    assert [resolve_base(stage.base, args) for stage in stages(instructions)] == ["a:1.0", "a:1.0"]
    with pytest.raises(ValueError, match="OTHER has no default"):
        resolve_base("${OTHER}", args)


@pytest.mark.parametrize(
    ("text", "message"),
    [("FROM a:1\nRUN x \\\n", "past the end"), ("FROM a:1 AS\n", "FROM image"), ("RUN x\n", "before the first")],
)
def test_parser_refuses_broken_files(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        stages(parse_dockerfile(text))


# ---- the images


@pytest.fixture(params=sorted(DOCKERFILES), ids=str)
def flavour(request: pytest.FixtureRequest) -> str:
    return request.param


def test_multi_stage_builder_then_runtime(flavour: str) -> None:
    parsed = read_stages(DOCKERFILES[flavour])
    assert len(parsed) >= 2, "a builder stage builds wheels, the runtime stage installs them"
    names = [stage.name for stage in parsed]
    assert "builder" in names[:-1]
    builder = parsed[names.index("builder")]
    assert any("pip wheel" in run.value for run in builder.all("RUN"))
    runtime = parsed[-1]
    from_builder = [run for run in runtime.all("RUN") if "from=builder" in run.value] + [
        copy for copy in runtime.all("COPY") if "--from=builder" in copy.value
    ]
    assert from_builder, "the runtime stage takes the builder's wheels"
    assert any("--no-index" in run.value for run in runtime.all("RUN")), "runtime installs offline, from wheels"


def test_installs_the_projects_own_extra(flavour: str) -> None:
    text = DOCKERFILES[flavour].read_text()
    assert f'".[{flavour}]"' in text and f'"gpuyard[{flavour}]"' in text
    assert flavour in PYPROJECT["project"]["optional-dependencies"]


def test_base_images_are_pinned(flavour: str) -> None:
    instructions = parse_dockerfile(DOCKERFILES[flavour].read_text())
    args = global_args(instructions)
    parsed = stages(instructions)
    bases = [resolve_base(stage.base, args) for stage in parsed]
    earlier: set[str] = set()
    for stage, base in zip(parsed, bases, strict=True):
        if base not in earlier:
            assert PINNED_TAG.match(base), f"{base!r} is not pinned to a version tag"
            assert not base.endswith(":latest")
        if stage.name:
            earlier.add(stage.name)
    if flavour == "gpu":
        assert all(base.startswith("nvidia/cuda:") for base in bases)
    else:
        assert all(base.startswith("python:3.11") for base in bases)


def test_the_base_image_is_a_build_argument(flavour: str) -> None:
    # Where no registry is reachable the CPU image builds on a local Debian base (deploy/debian-base.sh);
    # the GPU image takes another CUDA base the same way.
    instructions = parse_dockerfile(DOCKERFILES[flavour].read_text())
    assert "BASE_IMAGE" in global_args(instructions)
    assert all(stage.base == "${BASE_IMAGE}" for stage in stages(instructions))


def test_no_frontend_image_and_no_pip_settings_in_a_layer(flavour: str) -> None:
    # A `# syntax=` line makes BuildKit pull a frontend image from a registry. The building machine's pip
    # settings and CA bundle come in as secrets, mounted for one RUN: never ENV, ARG or COPY.
    text = DOCKERFILES[flavour].read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    builder = next(stage for stage in read_stages(DOCKERFILES[flavour]) if stage.name == "builder")
    (wheel,) = [run for run in builder.all("RUN") if "pip wheel" in run.value and "--no-index" not in run.value]
    for secret in ("pipconf", "ca"):
        assert f"--mount=type=secret,id={secret}," in wheel.value
    assert "--mount=type=cache,target=/root/.cache/pip" in wheel.value, "downloads cached between builds"
    assert "PIP_NO_CACHE_DIR" not in " ".join(env.value for env in builder.all("ENV"))
    for stage in read_stages(DOCKERFILES[flavour]):
        for ins in stage.all("ENV") + stage.all("ARG") + stage.all("COPY"):
            assert not re.search(r"PIP_(CERT|CONFIG_FILE|INDEX|EXTRA_INDEX)|pip\.conf|\.crt", ins.value), ins


def test_the_builder_copies_every_package_the_project_installs(flavour: str) -> None:
    # `gpuyard` (cli.main) in the image needs cli/: a package left out builds fine and fails at run time.
    packages = [pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]
    builder = next(stage for stage in read_stages(DOCKERFILES[flavour]) if stage.name == "builder")
    copied = {copy.value.split()[0] for copy in builder.all("COPY")}
    assert set(packages) <= copied, f"packages not copied into the builder: {sorted(set(packages) - copied)}"


def test_final_stage_runs_as_a_non_root_user(flavour: str) -> None:
    runtime = read_stages(DOCKERFILES[flavour])[-1]
    users = runtime.all("USER")
    assert users, "the final stage must set USER"
    user = users[-1].value.split(":")[0]
    assert user not in ("root", "0")
    # The user is created in this stage, before it is switched to.
    assert any("useradd" in run.value and user in run.value for run in runtime.all("RUN"))
    assert users[-1].line > max(run.line for run in runtime.all("RUN")), "no RUN as root after USER"


def test_healthcheck_and_command_run_files_the_image_holds(flavour: str) -> None:
    runtime = read_stages(DOCKERFILES[flavour])[-1]
    (healthcheck,) = runtime.all("HEALTHCHECK")
    probe = healthcheck.exec_form()
    assert probe and probe[:2] == ["python", "deploy/healthcheck.py"]
    assert probe[2] == ("worker" if flavour == "gpu" else "api")
    command = runtime.all("CMD")[-1].exec_form()
    assert command is not None
    workdir = runtime.all("WORKDIR")[-1].value
    copied = [copy.value.split() for copy in runtime.all("COPY") if "--from" not in copy.value]
    assert ["deploy/*.py", "./deploy/"] in copied and workdir == "/app"
    for argument in [*probe, *command]:
        if argument.startswith("deploy/"):
            assert (ROOT / argument).is_file(), argument


def test_copied_sources_exist_and_are_in_the_build_context(flavour: str) -> None:
    for stage in read_stages(DOCKERFILES[flavour]):
        for copy in stage.all("COPY"):
            words = [word for word in copy.value.split() if not word.startswith("--")]
            if "--from" in copy.value:
                continue
            for source in words[:-1]:
                matches = list(ROOT.glob(source))
                assert matches, f"COPY {source}: nothing in the repository"
                for match in matches:
                    relative = match.relative_to(ROOT).as_posix()
                    assert not dockerignored(relative), f"COPY {relative}, but .dockerignore leaves it out"


def test_environment_names_are_settings(flavour: str) -> None:
    unknown = gpuyard_names(DOCKERFILES[flavour].read_text()) - settings_env_names()
    assert not unknown, f"GPUYARD_* names that are no Settings field: {sorted(unknown)}"


def test_dockerignore_leaves_out_what_an_image_must_not_carry() -> None:
    for path in [".venv/bin/python", ".git/HEAD", ".gpuyard/gpuyard.db", "service/__pycache__/app.cpython-311.pyc",
                 ".pytest_cache/v", ".ruff_cache/x", "tests/models/data/x.py", "dist/gpuyard.whl", ".whl/a.whl",
                 "gpuyard.egg-info/PKG-INFO", ".env", "big.h5"]:  # fmt: skip
        assert dockerignored(path), path
    for path in ["pyproject.toml", "README.md", "models/spec.py", "core/settings.py", "service/app.py",
                 "deploy/healthcheck.py", "deploy/gunicorn.conf.py"]:  # fmt: skip
        assert not dockerignored(path), path

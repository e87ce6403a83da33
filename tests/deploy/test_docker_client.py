"""The Docker client is chosen when a recipe asks, after `make docker-engine` may have installed docker.io.

A fresh machine's first `make compose-test` used to fail: the Makefile chose the client with
``$(wildcard /usr/bin/docker)`` when make started, before docker.io was installed by the same run, and fell
back to a client without buildx.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from deploy_helpers import ROOT

SCRIPT = ROOT / "deploy" / "docker-engine.sh"


def _client(debian_docker: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "DOCKER"}
    env["DEBIAN_DOCKER"] = str(debian_docker)
    done = subprocess.run([str(SCRIPT), "--client"], env=env, capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip()


def test_client_is_chosen_when_asked_not_before(tmp_path: Path) -> None:
    debian_docker = tmp_path / "usr-bin-docker"
    assert _client(debian_docker) == "docker"  # not installed yet: the client first on PATH
    debian_docker.write_text("#!/bin/sh\n")
    debian_docker.chmod(0o755)  # what `apt-get install docker.io` does in the middle of the run
    assert _client(debian_docker) == str(debian_docker)


def test_an_explicit_client_wins(tmp_path: Path) -> None:
    env = {**os.environ, "DOCKER": "/opt/my/docker", "DEBIAN_DOCKER": str(tmp_path / "none")}
    done = subprocess.run([str(SCRIPT), "--client"], env=env, capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout.strip() == "/opt/my/docker"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_image_recipe_bakes_in_no_client() -> None:
    """`make -n` prints the recipe as make expands it when it starts: no client path may be baked in."""
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER", "MAKEFLAGS", "MAKELEVEL")}
    done = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "image"], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert "deploy/build-image.sh" in done.stdout
    assert "DOCKER=" not in done.stdout, done.stdout


def test_compose_test_recipe_asks_for_the_client_after_installing() -> None:
    """(Not run with `make -n`: a recipe line holding $(MAKE) runs even then.)"""
    makefile = (ROOT / "Makefile").read_text()
    assert "$(wildcard" not in makefile
    recipe = makefile.split("\ncompose-test:", 1)[1].split("\n\n", 1)[0]
    install = recipe.index("docker-engine")
    assert recipe.index("docker-engine.sh --client") > install
    assert "$(DOCKER)" not in recipe

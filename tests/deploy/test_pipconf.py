"""deploy/pipconf.py: this machine's pip settings as a pip.conf for a container build (no Docker needed)."""

from __future__ import annotations

import configparser
from pathlib import Path

from deploy.pipconf import ca_bundle, container_config

# What `pip config list` prints on the CI machines (config files first, then PIP_* variables).
LINES = [
    "global.cert='/etc/ssl/certs/ca-certificates.crt'",
    "global.constraint='/etc/xdg/pip/constraints.txt'",
    "global.extra-index-url='file:///opt/pypi/simple https://mirror.example/simple'",
    "global.find-links='/opt/wheels'",
    "global.index-url='https://pypi.example/simple'",
    "install.timeout='60'",
    ":env:.default-timeout='180'",
    ":env:.index-url='https://from-env.example/simple'",
]


def test_keeps_the_index_settings_and_leaves_out_this_machines_files() -> None:
    text, left_out = container_config(LINES)
    config = configparser.ConfigParser()
    config.read_string(text)
    assert dict(config["global"]) == {
        "extra-index-url": "https://mirror.example/simple",  # the file:// index is not visible in a build
        "index-url": "https://from-env.example/simple",  # PIP_INDEX_URL wins over the config file
        "default-timeout": "180",
    }
    assert dict(config["install"]) == {"timeout": "60"}
    dropped = " ".join(left_out)
    for path in ("/etc/xdg/pip/constraints.txt", "file:///opt/pypi/simple", "/opt/wheels", "ca-certificates"):
        assert path in dropped


def test_the_ca_bundle_is_pips_own(tmp_path: Path) -> None:
    assert ca_bundle(LINES) == Path("/etc/ssl/certs/ca-certificates.crt")
    assert ca_bundle([*LINES, f":env:.cert='{tmp_path}/ca.pem'"]) == tmp_path / "ca.pem"

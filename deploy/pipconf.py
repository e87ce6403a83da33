"""This machine's pip settings, as a pip.conf for a container build: ``python3 deploy/pipconf.py [--ca]``.

deploy/build-image.sh passes the result to ``docker build`` as the BuildKit secret ``pipconf`` (and the
CA bundle, ``--ca``, as the secret ``ca``), so that pip inside the build reaches the same index through
the same CA as pip here, and neither lands in a layer. Reads ``pip config list`` (config files and
``PIP_*`` variables, the variables winning). Leaves out what a container cannot see: local directories
and ``file://`` indexes (find-links, extra indexes, constraint files of this machine's disk) and the
``cert`` path (the CA bundle travels as its own secret).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

# `pip config list` prints one `<section or :env:>.<key>='<value>'` a line.
CONFIG_LINE = re.compile(r"^(?P<section>[^.]*)\.(?P<key>[^=]+)='(?P<value>.*)'$")
# Keys whose values name files of this machine; `cert` travels as the `ca` secret instead.
LOCAL_FILE_KEYS = {"cert", "client-cert", "constraint", "requirement", "build-constraint", "log", "cache-dir"}
DEFAULT_CA = Path("/etc/ssl/certs/ca-certificates.crt")


def is_local(location: str) -> bool:
    """Whether ``location`` (a find-links or index entry) is a path or ``file://`` URL of this machine."""
    return location.startswith(("file:", "/", "./", "../", "~"))


def container_config(lines: list[str]) -> tuple[str, list[str]]:
    """The pip.conf text for a build from ``pip config list`` output, and what was left out (and why)."""
    settings: dict[str, dict[str, str]] = {}
    matches = [match for match in map(CONFIG_LINE.match, (line.strip() for line in lines)) if match]
    # Environment variables override config files: `:env:` lines are applied last, into [global].
    for match in sorted(matches, key=lambda m: m["section"] == ":env:"):
        section = "global" if match["section"] == ":env:" else match["section"]
        settings.setdefault(section, {})[match["key"]] = match["value"]
    left_out: list[str] = []
    text: list[str] = []
    for section, entries in settings.items():
        kept: list[str] = []
        for key, value in entries.items():
            if key in LOCAL_FILE_KEYS:
                left_out.append(f"{section}.{key}={value} (a file of this machine)")
                continue
            words = value.split()
            local = [word for word in words if is_local(word)]
            if local:
                left_out.extend(f"{section}.{key}: {word} (local, not visible in the build)" for word in local)
                words = [word for word in words if not is_local(word)]
                if not words:
                    continue
            kept.append(f"{key} = {' '.join(words)}")
        if kept:
            text.append(f"[{section}]\n" + "\n".join(kept) + "\n")
    return "\n".join(text), left_out


def ca_bundle(lines: list[str]) -> Path | None:
    """The CA bundle pip uses here: its ``cert`` setting, else SSL_CERT_FILE, else Debian's bundle."""
    for line in reversed(lines):  # `:env:` lines come last and win
        match = CONFIG_LINE.match(line.strip())
        if match and match["key"] == "cert":
            return Path(match["value"])
    for candidate in (os.environ.get("SSL_CERT_FILE"), str(DEFAULT_CA)):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def pip_config_lines(python: str = sys.executable) -> list[str]:
    result = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False)
    return result.stdout.splitlines()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    lines = pip_config_lines()
    if args == ["--ca"]:
        bundle = ca_bundle(lines)
        if bundle is None:
            return 1
        print(bundle)
        return 0
    if args:
        print(f"usage: pipconf.py [--ca]. Received: {args}", file=sys.stderr)
        return 2
    text, left_out = container_config(lines)
    for note in left_out:
        print(f"pipconf: left out {note}", file=sys.stderr)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

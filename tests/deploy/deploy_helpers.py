"""Shared by the deploy tests: the repository's files, the GPUYARD_* names they use, Settings' names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKERFILES = {"cpu": ROOT / "deploy" / "Dockerfile.cpu", "gpu": ROOT / "deploy" / "Dockerfile.gpu"}
SCHEMA = ROOT / "deploy" / "schema" / "compose-spec.json"

GPUYARD_NAME = re.compile(r"\bGPUYARD_[A-Z0-9_]+\b")


def settings_env_names() -> set[str]:
    prefix = Settings.model_config.get("env_prefix", "GPUYARD_")
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def gpuyard_names(text: str) -> set[str]:
    return set(GPUYARD_NAME.findall(text))


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def validate_compose(document: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError unless ``document`` follows the Compose specification."""
    jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).validate(document)


def dockerignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def dockerignored(relative: str, patterns: list[str] | None = None) -> bool:
    """Whether Docker leaves ``relative`` (a path in the build context) out, last matching pattern wins.

    Docker's rules, as far as these files use them: patterns are relative to the context root (a leading
    ``/`` is dropped), ``**`` matches any number of directories, a pattern matching a directory excludes
    what is under it, ``!`` re-includes.
    """
    patterns = dockerignore_patterns() if patterns is None else patterns
    parts = relative.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        regex = _pattern_regex(pattern)
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """``*`` and ``?`` stay within one path segment; a ``**`` segment spans any number of them."""
    segments = []
    for segment in pattern.split("/"):
        if segment == "**":
            segments.append(".*")
            continue
        segments.append("".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in segment))
    regex = "/".join(segments).replace(".*/", "(?:.*/)?")
    return re.compile(regex)

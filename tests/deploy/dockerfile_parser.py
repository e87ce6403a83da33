"""A small Dockerfile reader for the static checks: instructions, line continuations, stages."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    value: str  # the rest, continuations joined with a space
    line: int  # 1-based line of the keyword

    def exec_form(self) -> list[str] | None:
        """The JSON array of a CMD/ENTRYPOINT/HEALTHCHECK CMD, or None for the shell form."""
        text = self.value.strip()
        if self.keyword == "HEALTHCHECK":
            match = re.search(r"\bCMD\s+(.*)$", text, re.DOTALL)
            text = match.group(1).strip() if match else ""
        if not text.startswith("["):
            return None
        return json.loads(text)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [ins for ins in self.instructions if ins.keyword == keyword]


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order; comments and blank lines dropped, ``\\`` continuations joined.

    Raises:
        ValueError: a continuation runs past the end of the file, or a line has no instruction keyword.
    """
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction is dropped, the instruction goes on
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(part for part in pending if part)
        pending = []
        keyword, _, value = joined.partition(" ")
        if not re.fullmatch(r"[A-Za-z]+", keyword):
            raise ValueError(f"line {start}: expected an instruction keyword. Received: {joined[:60]!r}")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
    if pending:
        raise ValueError(f"line {start}: the continuation runs past the end of the file")
    return instructions


def stages(instructions: list[Instruction]) -> list[Stage]:
    """Split at each FROM: ``FROM image[:tag] [AS name]`` (``--platform=...`` flags skipped)."""
    result: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = [word for word in ins.value.split() if not word.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            if len(words) not in (1, 3) or (len(words) == 3 and name is None):
                raise ValueError(f"line {ins.line}: expected FROM image [AS name]. Received: {ins.value!r}")
            result.append(Stage(base=words[0], name=name))
        elif not result:
            if ins.keyword != "ARG":
                raise ValueError(f"line {ins.line}: {ins.keyword} before the first FROM")
        else:
            result[-1].instructions.append(ins)
    return result


def global_args(instructions: list[Instruction]) -> dict[str, str | None]:
    """The ``ARG name[=default]`` lines before the first FROM: the build arguments a FROM may use."""
    args: dict[str, str | None] = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG":
            name, sep, default = ins.value.partition("=")
            args[name.strip()] = default.strip() if sep else None
    return args


def resolve_base(base: str, args: dict[str, str | None]) -> str:
    """``base`` with ``${NAME}``/``$NAME`` replaced by the build argument's default.

    Raises:
        ValueError: the base names an argument without a default.
    """

    def default(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        value = args.get(name)
        if value is None:
            raise ValueError(f"FROM {base}: build argument {name} has no default")
        return value

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", default, base)


def read_stages(path: Path) -> list[Stage]:
    return stages(parse_dockerfile(path.read_text()))

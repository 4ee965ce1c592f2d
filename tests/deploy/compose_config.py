"""
What `docker compose` makes of our files, computed here because no compose plugin is installed: the project
directory and `.env` a command line reads, the variables it interpolates into the whole file for every command
(a `${VAR:?err}` stops `down` as surely as `up`), and the names its volumes get. Compose's documented rules,
nothing more; an `.env` outside the plain `KEY=value` form is refused rather than guessed at.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

NAME = re.compile(r"[_a-zA-Z][_a-zA-Z0-9]*")
BRACED = re.compile(rf"({NAME.pattern})(?:(:?[-?+])(.*))?", re.DOTALL)  # name, operator, its argument
VALUE_FLAGS = {"-f", "--file", "--env-file", "--project-directory", "-p", "--project-name", "--profile"}


class MissingRequired(Exception):
    """A `${VAR:?err}` (or `${VAR?err}`) without its variable: compose exits with this message."""


class Interpolation:
    """Compose's interpolation under one environment; `unset` collects the variables that had neither a value
    nor a default (compose warns and substitutes "")."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.unset: set[str] = set()

    def __call__(self, text: str) -> str:
        out, i = [], 0
        while i < len(text):
            if text.startswith("$$", i):  # a literal $
                out.append("$")
                i += 2
            elif text.startswith("${", i):
                end = closing_brace(text, i + 2)
                out.append(self.braced(text[i + 2:end]))
                i = end + 1
            elif text[i] == "$" and (name := NAME.match(text, i + 1)):
                out.append(self.value(name.group()))
                i = name.end()
            else:
                out.append(text[i])
                i += 1
        return "".join(out)

    def braced(self, expr: str) -> str:
        match = BRACED.fullmatch(expr)
        if not match:
            raise ValueError(f"invalid interpolation ${{{expr}}}")
        name, operator, argument = match.groups()
        if operator is None:
            return self.value(name)
        value = self.env.get(name)
        # with a colon, empty counts as missing
        present = bool(value) if operator.startswith(":") else value is not None
        if operator.endswith("-"):
            return value if present else self(argument)
        if operator.endswith("+"):
            return self(argument) if present else ""
        if not present:
            raise MissingRequired(f"required variable {name} is missing a value: {self(argument)}")
        return value

    def value(self, name: str) -> str:
        if name not in self.env:
            self.unset.add(name)
        return self.env.get(name, "")

    def tree(self, node: Any) -> Any:
        """Every string in a parsed compose file interpolated (compose does it after parsing the YAML)."""
        if isinstance(node, dict):
            return {key: self.tree(value) for key, value in node.items()}
        if isinstance(node, list):
            return [self.tree(item) for item in node]
        return self(node) if isinstance(node, str) else node


def closing_brace(text: str, start: int) -> int:
    """Index of the } that closes the ${ opened just before `start` (defaults may nest)."""
    depth, i = 1, start
    while i < len(text):
        if text.startswith("${", i):
            depth, i = depth + 1, i + 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError(f"unclosed ${{ in {text!r}")


def read_env_file(path: Path) -> dict[str, str]:
    """An `.env` in the plain form we write: comments, blank lines, `KEY=value` without quotes or `$`."""
    env = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not (sep and NAME.fullmatch(key) and not re.search(r"[\"'$#\s]", value)):
            raise ValueError(f"{path}: {line!r} is outside the plain KEY=value form")
        env[key] = value
    return env


@dataclass
class Invocation:
    """One `docker compose` command line as compose resolves it."""

    files: list[Path]
    project_directory: Path
    env: dict[str, str]  # what compose interpolates with: .env values under the process environment
    command: list[str]

    def config(self) -> tuple[dict, set[str]]:
        """The interpolated file and the variables left unset; raises MissingRequired as compose would."""
        (file,) = self.files  # merging several -f files is compose's, not needed here
        interpolation = Interpolation(self.env)
        return interpolation.tree(yaml.safe_load(file.read_text())), interpolation.unset

    def project_name(self, config: dict) -> str:
        return self.env.get("COMPOSE_PROJECT_NAME") or config.get("name") or self.project_directory.name


def invocation(argv: list[str], environ: Mapping[str, str], cwd: Path) -> Invocation:
    """`docker` argv (`compose`, its global flags, the command) run in `cwd` with `environ`. The project
    directory is --project-directory, else the first -f file's folder, else cwd; `.env` is read from it unless
    --env-file names files (which must exist)."""
    assert argv[0] == "compose", argv
    flags: dict[str, list[str]] = {}
    i = 1
    while i < len(argv) and argv[i].startswith("-"):
        flag, eq, value = argv[i].partition("=")
        assert flag in VALUE_FLAGS, f"flag {flag} unknown to this model of compose"
        if not eq:
            i, value = i + 1, argv[i + 1]
        flags.setdefault(flag.replace("--file", "-f"), []).append(value)
        i += 1
    files = [cwd / f for f in flags.get("-f", [])]
    directory = flags.get("--project-directory")
    project_directory = cwd / directory[0] if directory else files[0].parent if files else cwd
    env_files = [cwd / f for f in flags.get("--env-file", [])]
    for path in env_files:
        if not path.is_file():
            raise FileNotFoundError(f"couldn't find env file: {path}")
    if not env_files and (project_directory / ".env").is_file():
        env_files = [project_directory / ".env"]
    env: dict[str, str] = {}
    for path in env_files:
        env |= read_env_file(path)
    env |= environ  # the shell wins over .env
    name = flags.get("-p") or flags.get("--project-name")
    if name:
        env["COMPOSE_PROJECT_NAME"] = name[0]
    return Invocation(files or [cwd / "compose.yaml"], project_directory, env, argv[i:])


def volume_names(config: dict, project: str) -> dict[str, str]:
    """Top-level volume key -> the Docker volume compose creates: its `name`, else `<project>_<key>`."""
    return {key: (spec or {}).get("name") or f"{project}_{key}" for key, spec in (config.get("volumes") or {}).items()}

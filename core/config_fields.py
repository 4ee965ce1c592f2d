"""
The one config dialect of the engine, the exporter and the BFF: a dataclass field with a default, an inclusive
range or choices, one line of doc and its environment variable; one parser from text (environment, CLI,
config.pbtxt) driven by the field's resolved type; one table of boolean spellings, where an unknown one is an
error. Standard library only and in core, which imports nothing of the project: every layer, the BFF's image
included, can import it.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field

REQUIRED = MISSING  # a field with no default
AUTO = "auto"  # a value the exporter works out for the machine (fields declared with auto=True)
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
SPELLINGS = ", ".join(f"{t}/{f}" for t, f in zip(TRUE, FALSE, strict=True))
WANTED = {int: "an integer", float: "a number", bool: f"a boolean ({SPELLINGS})"}


def setting(default: object, doc: str, *, low: float | None = None, high: float | None = None,
            choices: tuple[str, ...] | None = None, env: str | None = None, auto: bool = False,
            sep: str | None = ",") -> Field:
    """A field: its default (REQUIRED: none), inclusive bounds (either may be None) or choices, one line of doc,
    its environment variable, whether AUTO is also a value, and what separates a tuple's items in one string
    (None: whitespace)."""
    meta = {"doc": doc, "low": low, "high": high, "choices": choices, "env": env, "auto": auto, "sep": sep}
    return dataclasses.field(default=default, metadata=meta)


@functools.cache
def hints(cls: type) -> dict[str, type]:
    """Each field's type, resolved from its annotation (modules here use `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def kind_of(cls: type, f: Field) -> type:
    """The type a field's text parses to: its annotation without None (and without str for an auto field)."""
    kind = hints(cls)[f.name]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        (kind,) = [k for k in typing.get_args(kind) if k is not type(None) and not (f.metadata["auto"] and k is str)]
    return kind


def boolean(raw: str, name: str) -> bool:
    """One table of boolean spellings for every variable; any other spelling is an error, never a silent false."""
    if raw.lower() in TRUE + FALSE:
        return raw.lower() in TRUE
    raise ValueError(f"{name}={raw!r} is not {WANTED[bool]}")


def parse(cls: type, f: Field, raw: str, name: str) -> object:
    """A field's value from text (an environment variable, a CLI value, a config.pbtxt parameter); a ValueError
    names `name` and the text."""
    if f.metadata["auto"] and raw == AUTO:
        return AUTO
    kind = kind_of(cls, f)
    if typing.get_origin(kind) is tuple:
        return tuple(part.strip() for part in raw.split(f.metadata["sep"]) if part.strip())
    if kind is bool:
        return boolean(raw, name)
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not {WANTED[kind]}" + (" or auto" if f.metadata["auto"] else "")) \
            from None


def env_name(f: Field) -> str:
    """What an error calls a field: its environment variable, or its name where it has none."""
    return f.metadata.get("env") or f.name


def check(obj: object, name: Callable[[Field], str] = env_name) -> None:
    """Every setting() field of a dataclass within its choices and bounds; a ValueError names the one that is not."""
    for f in dataclasses.fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        if "doc" not in meta or value is None or (meta["auto"] and value == AUTO):
            continue
        if meta["choices"] and value not in meta["choices"]:
            raise ValueError(f"{name(f)} must be one of {', '.join(meta['choices'])}, got {value!r}")
        low, high = meta["low"], meta["high"]
        if low is None and high is None:
            continue
        number = kind_of(type(obj), f) is float
        bounds = f"in [{low}, {high}]" if low is not None and high is not None else (
            f">= {low}" if low is not None else f"<= {high}")
        if not (isinstance(value, (int, float) if number else int) and (low is None or value >= low)
                and (high is None or value <= high)):
            raise ValueError(f"{name(f)} must be {WANTED[float if number else int]} {bounds}, got {value!r}")

"""
`python -m export`: the CLI behind `make export`. Its flags are export/options.py's fields; with --env it
also reads each option from the environment variable of its name in capitals, which is how the Makefile's
variables (MODEL=d20 MAX_SLOTS=16 FORCE=1 ...) reach it. A flag given on the command line wins.

Exit codes: 0 exported; 2 bad input (unknown tag or step, bad option, no GPU for RUNTIME=tensorrt,
target not writable or holding another model) with the reason on stderr; 1 an unexpected failure;
130 interrupted. In every failing case the repository keeps what it had before.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import typing
from collections.abc import Callable

from core.config_fields import kind_of, parse
from export.options import ExportOptions, fields, from_env, options, variable
from export.pipeline import ExportError, export_model


def _text(cls: type, f: dataclasses.Field) -> Callable[[str], object]:
    """A flag's value from its text, by the one parser of the environment and config.pbtxt."""
    def value(raw: str) -> object:
        try:
            return parse(cls, f, raw, variable(f))
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a nanochat checkpoint to a Triton model: ONNX graph (+ TensorRT engine on GPU "
                    "nodes), tokenizer, metadata and config.pbtxt, written atomically into the model repository. "
                    "Each option is also a make variable: its name in capitals (make export MODEL=d20 FORCE=1).",
    )
    for cls, f in fields():
        flag, doc, kind = "--" + f.name.replace("_", "-"), f.metadata["doc"], kind_of(cls, f)
        default = f" (default: {f.default})" if f.default is not None and kind is not bool else ""
        if typing.get_origin(kind) is tuple:
            p.add_argument(flag.removesuffix("s"), dest=f.name, action="append", default=None, help=doc,
                           metavar="KEY=VALUE")
        elif kind is bool:
            off = f.default is True  # a flag that turns a default-on option off
            p.add_argument(f"--no-{f.name}" if off else flag, dest=f.name, default=None, help=doc,
                           action="store_false" if off else "store_true")
        else:
            p.add_argument(flag, type=_text(cls, f), choices=f.metadata["choices"], default=None, help=doc + default)
    p.add_argument("--env", action="store_true", help="read options not given as flags from the environment "
                                                      "(MODEL, MAX_SLOTS, ...: what make passes)")
    return p


def parse_options(argv: list[str] | None = None, env: dict[str, str] | None = None) -> ExportOptions:
    """ExportOptions from the command line (and, with --env, the environment); ValueError if one is bad."""
    a = vars(parser().parse_args(argv))
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in a.items() if v is not None and k != "env"}
    return options(**{**(from_env(env) if a["env"] else {}), **given})


_terminated = []  # set by SIGTERM: torch may wrap the KeyboardInterrupt raised below in its own errors


def _terminate(signum, frame):
    _terminated.append(signum)
    raise KeyboardInterrupt  # so the staging folder is removed on `kill` as on Ctrl-C


def main(argv: list[str] | None = None) -> int:
    try:
        options = parse_options(argv)
    except ValueError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    try:
        export_model(options)
    except ExportError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    except BaseException as e:
        if not (_terminated or isinstance(e, KeyboardInterrupt)):
            raise
        print("export: interrupted; the model repository is unchanged", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    code = main()
    if code == 130:
        # CPython ends by killing itself with SIGINT, whatever main returned, once a KeyboardInterrupt has left
        # any code run through PyRun_* (a C extension's, during torch's lazy imports): exit before that check
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

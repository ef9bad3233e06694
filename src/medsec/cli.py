"""`medsec <verb>`: data, train, attack, reproduce, keys, sign, verify.

Every verb reports user errors as one line on stderr and a non-zero exit code; tracebacks are
for bugs only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from medsec.errors import MedsecError

# Each entry registers one or more verbs on the sub-parser collection.
Registrar = Callable[[argparse._SubParsersAction], None]


def _registrars() -> list[Registrar]:
    from medsec.evaluation import cli as eval_cli
    from medsec.integrity import cli as integrity_cli
    from medsec.service import cli as service_cli

    return [eval_cli.register, integrity_cli.register, service_cli.register]


def build_parser() -> argparse.ArgumentParser:
    import medsec

    parser = argparse.ArgumentParser(
        prog="medsec",
        description="Security of medical-imaging AI: reproduce defences, attack them "
        "adaptively, and sign images so any change is caught.",
    )
    parser.add_argument("--version", action="version", version=f"medsec {medsec.__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    sub.required = True
    for register in _registrars():
        register(sub)
    return parser


def _environment_errors() -> tuple[type[BaseException], ...]:
    """What the world, not the code, can cause: files and directories that cannot be read or
    written, a decompression bomb, input nested deeper than the interpreter can follow."""
    from PIL import Image

    return (OSError, Image.DecompressionBombError, RecursionError)


def _one_line(exc: BaseException) -> str:
    """The reason in one line: OSError as 'PATH: strerror', others by their message."""
    if isinstance(exc, OSError) and exc.strerror:
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        text = f"{where}: {exc.strerror}" if where else exc.strerror
    elif isinstance(exc, RecursionError):
        text = "input is nested too deeply to process"
    else:
        text = str(exc) or exc.__class__.__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb; every user or environment error becomes one line on stderr.

    MedsecError carries its own exit code; OSError and friends exit 2. Anything else is a bug
    and keeps its traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MedsecError as exc:
        print(f"medsec {args.verb}: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"medsec {args.verb}: interrupted (rerun to resume)", file=sys.stderr)
        return 130
    except _environment_errors() as exc:
        print(f"medsec {args.verb}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MedsecError as exc:
        print(f"medsec {args.verb}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"medsec {args.verb}: interrupted (rerun to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

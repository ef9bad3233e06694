"""argparse ``type=`` validators shared by every verb: a bad value is a usage error (exit 2,
one line naming the option) before any work starts, never a silent default."""

from __future__ import annotations

import argparse
from fractions import Fraction


def positive_int(text: str) -> int:
    """An integer >= 1 (epochs, steps, images, restarts)."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (GPUs per task: a fraction shares one)."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def seed_value(text: str) -> int:
    """A seed every generator accepts (NumPy's limit: 0 .. 2**32 - 1)."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from exc
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"seed must lie in 0 .. 2**32 - 1, got {value}")
    return value


def parse_eps(text: str) -> float:
    """'4/255' or '0.0157' -> float in [0,1] pixel units."""
    try:
        value = float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError) as exc:
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from exc
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"eps must lie in [0, 1] pixel units, got {value}")
    return value


def device_name(text: str) -> str:
    """A device torch knows and this machine has: auto | cpu | cuda[:N] | mps."""
    from medsec.errors import MedsecError
    from medsec.utils import resolve_device

    try:
        resolve_device(text)
    except MedsecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text

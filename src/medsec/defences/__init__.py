"""Defence registry. Each defence registers a study entry that builds (or loads) the defended
pipeline or detector, evaluates it non-adaptively as its paper did, then attacks it adaptively,
and returns metrics.json rows (via ``StudyContext.cell`` so work is resumable).

``create_defence``-style construction lives in each defence module; this registry is what
``medsec reproduce --defences NAMES`` selects from.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medsec.errors import MedsecError

if TYPE_CHECKING:
    from medsec.evaluation.context import StudyContext

StudyRun = Callable[["StudyContext"], list[dict[str, Any]]]


@dataclass(frozen=True)
class DefenceEntry:
    name: str
    family: str
    summary: str
    run: StudyRun


_REGISTRY: dict[str, DefenceEntry] = {}
# Modules that register defences when imported (kept explicit: no import-time magic).
_MODULES = (
    "medsec.evaluation.baseline",
    "medsec.defences.robust.study",
    "medsec.defences.detection.study",
)


def register_defence(name: str, family: str, summary: str) -> Callable[[StudyRun], StudyRun]:
    """Decorator: make a study entry selectable by ``name``."""

    def deco(run: StudyRun) -> StudyRun:
        _REGISTRY[name] = DefenceEntry(name, family, summary, run)
        return run

    return deco


def _load() -> None:
    for mod in _MODULES:
        importlib.import_module(mod)


def list_defences() -> list[DefenceEntry]:
    _load()
    return list(_REGISTRY.values())


def get_defence(name: str) -> DefenceEntry:
    _load()
    if name not in _REGISTRY:
        raise MedsecError(f"unknown defence {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]

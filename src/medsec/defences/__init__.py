"""Defences: the contract (:mod:`.base`), the registry, and plug-ins.

Every module under ``medsec.defences`` is imported on first use of the registry, and each
defence registers itself with ``@register_defence`` in its own file: adding a built-in
defence is one new file. A user's own defence needs no edit to medsec at all:
``medsec reproduce --defences none,path/to/file.py:NAME`` (or ``package.module:NAME``),
NAME being a Defence subclass or instance (see docs/plugins.md).
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path
from typing import Any, TypeVar

from medsec.defences.base import FAMILIES, BuildEnv, Defence, Deployed, FitData, Pipeline
from medsec.errors import MedsecError

__all__ = [
    "FAMILIES",
    "BuildEnv",
    "Defence",
    "Deployed",
    "FitData",
    "Pipeline",
    "get_defence",
    "list_defences",
    "load_defence",
    "register_defence",
]

_REGISTRY: dict[str, Defence] = {}
_LOADED = False
T = TypeVar("T")


def register_defence(cls: T) -> T:
    """Class decorator: make a Defence subclass selectable by its ``name``."""
    obj = _as_defence(cls, repr(cls), plugin=False)
    if obj.name in _REGISTRY and type(_REGISTRY[obj.name]) is not type(obj):
        raise MedsecError(f"two defences are named {obj.name!r}")
    _REGISTRY[obj.name] = obj
    return cls


def _load_builtins() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for mod in pkgutil.walk_packages(__path__, prefix=f"{__name__}."):
        importlib.import_module(mod.name)


def _order(d: Defence) -> tuple[int, str]:
    return list(FAMILIES).index(d.family), d.name


def list_defences() -> list[Defence]:
    """Every built-in entry, in report order (family table, then name)."""
    _load_builtins()
    return sorted(_REGISTRY.values(), key=_order)


def get_defence(name: str) -> Defence:
    """A built-in entry by name, or a plug-in ``FILE.py:NAME`` / ``package.module:NAME``."""
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return load_defence(name)
    raise MedsecError(f"unknown defence {name!r}; available: {', '.join(sorted(_REGISTRY))}")


def _as_defence(obj: Any, what: str, plugin: bool = True) -> Defence:
    """A Defence instance from a subclass or an instance, its declarations checked."""
    if isinstance(obj, type) and issubclass(obj, Defence):
        try:
            obj = obj()
        except Exception as exc:
            raise MedsecError(f"{what}: cannot instantiate: {exc}") from exc
    if not isinstance(obj, Defence):
        raise MedsecError(f"{what} is not a medsec.defences.Defence subclass or instance")
    if not obj.name or not isinstance(obj.name, str):
        raise MedsecError(f"{what}: a defence needs a non-empty string `name`")
    if plugin and obj.family not in ("robustification", "detection"):
        raise MedsecError(f"{what}: family must be 'robustification' or 'detection'")
    if obj.family not in FAMILIES:
        raise MedsecError(f"{what}: unknown family {obj.family!r}")
    if obj.working_eps is not None and not 0 < obj.working_eps <= 1:
        raise MedsecError(f"{what}: working_eps must lie in (0, 1] pixel units")
    return obj


def load_defence(spec: str) -> Defence:
    """A plug-in defence from ``path/to/file.py:NAME`` or ``package.module:NAME``."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise MedsecError(f"plug-in {spec!r}: expected FILE.py:NAME or package.module:NAME")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise MedsecError(f"plug-in {spec!r}: no such file {path}")
        mod_name = f"medsec_plugin_{abs(hash(str(path.resolve())))}"
        loader = importlib.util.spec_from_file_location(mod_name, path)
        if loader is None or loader.loader is None:
            raise MedsecError(f"plug-in {spec!r}: {path} is not a Python module")
        module = importlib.util.module_from_spec(loader)
        sys.modules[mod_name] = module
        try:
            loader.loader.exec_module(module)
        except Exception as exc:
            raise MedsecError(f"plug-in {spec!r}: importing {path} failed: {exc!r}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise MedsecError(f"plug-in {spec!r}: cannot import {target}: {exc!r}") from exc
    if not hasattr(module, attr):
        raise MedsecError(f"plug-in {spec!r}: {target} has no attribute {attr!r}")
    return _as_defence(getattr(module, attr), f"plug-in {spec!r}")

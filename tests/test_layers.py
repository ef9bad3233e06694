"""Lower layers never import higher ones (checked on the source, so a new import that breaks
the layering fails here rather than as an import cycle later)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "medsec"
# package -> the medsec packages it may import (besides itself)
ALLOWED = {
    "errors": set(),
    "utils": {"errors"},
    "imaging": {"errors"},  # DICOM pixels -> model input, shared by data, models and service
    "paths": {"errors", "utils"},
    "cache": {"errors", "utils"},
    "data": {"errors", "utils", "paths", "cache", "imaging"},
    "attacks": {"errors", "utils"},
    "models": {"errors", "utils", "paths", "data", "imaging"},
    "integrity": {"errors", "utils", "paths"},
    "defences": {"errors", "utils", "paths", "cache", "data", "models", "attacks"},
}


def imported_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        out |= {n.split(".")[1] for n in names if n.startswith("medsec.") and n.count(".") >= 1}
    return out


def test_lower_layers_do_not_import_higher_ones():
    bad = []
    for pkg, allowed in ALLOWED.items():
        files = (
            [SRC / f"{pkg}.py"] if (SRC / f"{pkg}.py").exists() else list((SRC / pkg).rglob("*.py"))
        )
        assert files, pkg
        for f in files:
            extra = imported_packages(f) - allowed - {pkg}
            if extra:
                bad.append(f"{f.relative_to(SRC)} imports {sorted(extra)}")
    assert not bad, bad

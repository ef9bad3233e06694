"""`medsec grid`: one study per data set x architecture x seed, then one combined table of
verdicts and adaptive ASRs (with intervals) per defence across them.

The config is TOML (relative paths are relative to the config file)::

    profile = "quick"                          # tiny | quick | full
    datasets = ["fundus-lesion", "cxr-nodule"] # or medmnist:FILE.npz, folder:DIR, dicom:CSV
    archs = ["small-cnn", "resnet-mini"]
    defences = "all"                           # or a list of names / FILE.py:NAME plug-ins
    seeds = [0]
"""

from __future__ import annotations

import json
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medsec.cache import slug
from medsec.errors import MedsecError
from medsec.evaluation.context import PROFILES, Profile
from medsec.evaluation.executor import Study
from medsec.evaluation.figures import plot_verdict_grid
from medsec.utils import atomic_write_json, atomic_write_text

GRID_MARKER = ".medsec-grid"
KEYS = {"profile", "datasets", "archs", "defences", "seeds"}


@dataclass(frozen=True)
class GridConfig:
    profile: Profile
    datasets: tuple[str, ...]
    archs: tuple[str, ...]
    defences: str
    seeds: tuple[int, ...]

    def studies(self, out: Path) -> list[Study]:
        """One study per combination, each in its own folder under ``out``."""
        found = [
            Study(
                out / slug(f"{d.rsplit('/', 1)[-1]}-{a}-s{s}"), d, self.defences, a, s, self.profile
            )
            for d in self.datasets
            for a in self.archs
            for s in self.seeds
        ]
        folders = [s.out.name for s in found]
        twice = sorted({f for f in folders if folders.count(f) > 1})
        if twice:
            raise MedsecError(f"grid config: two data sets share the folder name {twice[0]!r}")
        return found


def short(dataset: str) -> str:
    """A data set's name for folders and table headers (the file name of a path)."""
    return dataset.rsplit("/", 1)[-1]


def _strings(raw: Any, what: str) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(v, str) and v for v in raw):
        raise MedsecError(f"grid config: {what} must be a non-empty list of strings")
    return tuple(dict.fromkeys(raw))


def absolute(spec: str, base: Path) -> str:
    """A data set or plug-in spec with its file path made absolute against ``base`` (workers
    may run elsewhere); names of built-ins and embedded data are kept."""
    kind, sep, rest = spec.partition(":")
    if spec.endswith(".py") or ".py:" in spec:  # a plug-in FILE.py:NAME
        path, _, name = spec.rpartition(":")
        return f"{(base / path).resolve()}:{name}"
    if sep and kind in ("medmnist", "folder", "dicom"):
        return f"{kind}:{(base / rest).resolve()}"
    if (base / spec).exists() and not sep:
        return str((base / spec).resolve())
    return spec


def load_config(path: Path) -> GridConfig:
    """Read and check a grid config; every mistake is one clear error."""
    from medsec.evaluation.study import resolve_defences
    from medsec.models import list_models

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise MedsecError(f"cannot read grid config {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise MedsecError(f"grid config {path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise MedsecError(f"grid config: unknown key(s) {unknown}; known: {sorted(KEYS)}")
    base = path.parent
    profile = raw.get("profile", "quick")
    if profile not in PROFILES:
        raise MedsecError(f"grid config: unknown profile {profile!r}; choose {', '.join(PROFILES)}")
    archs = _strings(raw.get("archs", ["small-cnn"]), "archs")
    bad = [a for a in archs if a not in list_models()]
    if bad:
        raise MedsecError(
            f"grid config: unknown arch {bad[0]!r}; choose {', '.join(list_models())}"
        )
    seeds = raw.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise MedsecError("grid config: seeds must be a non-empty list of integers >= 0")
    defences = raw.get("defences", "all")
    names = _strings(defences.split(",") if isinstance(defences, str) else defences, "defences")
    defences = ",".join(absolute(n.strip(), base) for n in names)
    resolve_defences(defences)  # a typo is refused before anything runs
    datasets = tuple(absolute(d, base) for d in _strings(raw.get("datasets"), "datasets"))
    return GridConfig(PROFILES[profile], datasets, archs, defences, tuple(dict.fromkeys(seeds)))


def _cell(h: dict[str, Any]) -> str:
    lo, hi = h["adaptive_ci"]
    return (
        f"{h['verdict']}: {h['adaptive_asr']:.2f} [{lo:.2f}, {hi:.2f}] "
        f"(undefended {h['undefended_asr']:.2f}) at {h['eps_255']:g}/255"
    )


def combine(studies: list[Study], out: Path, record: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """grid.md + grid.json: per defence, the verdict and adaptive ASR in each study."""
    from medsec.evaluation.study import read_metrics

    done = []
    for s in studies:
        m = read_metrics(s.out)
        done.append(
            {
                "dir": s.out.name,
                "dataset": s.dataset,
                "arch": s.arch,
                "seed": s.seed,
                "clean_accuracy": m["victim"].get("clean_accuracy"),
                "wall_time_s": m.get("wall_time_s"),
                "headline": m.get("headline", []),
            }
        )
    defences = list(dict.fromkeys(h["defence"] for d in done for h in d["headline"]))
    header = [
        "defence",
        *(f"{d['dataset'].rsplit('/', 1)[-1]} / {d['arch']} / s{d['seed']}" for d in done),
    ]
    rows = [
        ["clean accuracy", *(f"{d['clean_accuracy']:.3f}" for d in done)],
        *(
            [
                name,
                *(
                    next((_cell(h) for h in d["headline"] if h["defence"] == name), "-")
                    for d in done
                ),
            ]
            for name in defences
        ),
    ]
    if defences:
        judged = {
            (r, c): (h["adaptive_asr"], h["undefended_asr"], h["verdict"])
            for r, name in enumerate(defences)
            for c, d in enumerate(done)
            for h in d["headline"]
            if h["defence"] == name
        }
        plot_verdict_grid(out / "grid.png", defences, header[1:], judged)
    result = {**record, "studies": done}
    atomic_write_json(out / "grid.json", result)
    lines = [
        "# medsec grid",
        "",
        f"{len(done)} studies, profile {record['profile']}, executor {record['executor']}, "
        f"wall time {record['wall_time_s']:.0f} s. Each cell: verdict, adaptive ASR [95% "
        "Clopper-Pearson interval] (the undefended victim's ASR) at the defence's working "
        "budget. Each study's own report is in its folder.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]
    if defences:
        lines += ["", "![adaptive ASR minus the undefended victim's, per study](grid.png)"]
    if record.get("workers"):
        lines += ["", "## Workers", "", "```", record["workers_text"], "```"]
    path = out / "grid.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path, result


def run_grid(
    cfg: GridConfig,
    out: Path,
    *,
    executor: str = "serial",
    address: str | None = None,
    cpus_per_task: int | None = None,
    gpus_per_task: float = 0.0,
    device: torch.device | None = None,
    progress: bool = True,
) -> Path:
    """Every study of the grid (resumable: finished cells are read back), then grid.md."""
    from medsec.evaluation import executor as ex

    studies = cfg.studies(out)
    for s in studies:
        ex.claim_study_dir(s.out)
    t0 = time.perf_counter()
    record: dict[str, Any] = {"profile": cfg.profile.name, "executor": executor}
    if executor == "ray":
        _, tasks = ex.run_ray(
            studies,
            address=address,
            cpus_per_task=cpus_per_task,
            gpus_per_task=gpus_per_task,
            progress=progress,
        )
        rows = ex.worker_summary(tasks)
        record |= {"workers": rows, "workers_text": ex.format_summary(rows)}
    else:
        ex.run_serial(studies, device or torch.device("cpu"), progress)
    record["wall_time_s"] = time.perf_counter() - t0
    record["config"] = json.loads(json.dumps(cfg.__dict__, default=str))
    return combine(studies, out, record)[0]

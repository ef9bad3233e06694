"""Where a study's work runs: serially in this process (the default) or as Ray tasks.

A study is a chain of cached cells (medsec.evaluation.context): inside one defence entry the
cells depend on each other (the adaptive attack starts from the best plain one, detectors
are fitted on the plain attacks), across entries they do not. So the Ray executor runs

1. one task per study that trains (or loads) its victim;
2. one task per (study, defence entry), the signature gate excepted, that computes the
   entry's cells into the study's own cell cache;
3. one task per study that reruns the whole study, every cell now read from the cache, and
   writes its report (the gate, last, sees every adversarial image).

Each task waits only for its own study's earlier stage. Results are the serial run's (with
the serial run's threads per task, the default: see ``run_ray``): every cell's random state
is seeded from its key, never from scheduling order, and every cell and artefact is written
atomically under a lock, so two workers needing the same one compute it once, a worker
killed mid-cell leaves nothing half-written (Ray retries its task, which finds every
finished cell), and a run can be resumed by either executor. ``out`` must be on a
filesystem every worker can write to.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medsec.errors import MedsecError
from medsec.evaluation.context import PROFILES, Profile

EXECUTORS = ("serial", "ray")
RUN_MARKER = ".medsec-run"  # written first into a study's directory: "this is ours"
_RUN_NAMES = {
    "cells",
    "artifacts",
    "figures",
    "report.md",
    "report.html",
    "metrics.json",
    "metrics.csv",
}
RETRIES = 3  # Ray re-runs a task whose worker died this many times


@dataclass(frozen=True)
class Study:
    """The settings of one ``medsec reproduce`` run (plug-in paths made absolute)."""

    out: Path
    dataset: str = "fundus-lesion"
    defences: str = "all"
    arch: str = "small-cnn"
    seed: int = 0
    profile: Profile = PROFILES["full"]

    def entries(self) -> list[str]:
        """The defence entries (names or plug-in specs) whose cells a worker can compute
        alone: all but the integrity family, which needs every other entry's images."""
        from medsec.evaluation.study import resolve_defences

        resolve_defences(self.defences)  # the whole list is valid (no typo, no clash)
        if self.defences in ("", "all"):
            return [d.name for d in resolve_defences("all") if d.family != "integrity"]
        specs = list(dict.fromkeys(s.strip() for s in self.defences.split(",") if s.strip()))
        return [s for s in specs if resolve_defences(s)[0].family != "integrity"]

    def label(self) -> str:
        return f"{self.dataset} / {self.arch} / seed {self.seed}"


@dataclass(frozen=True)
class TaskReport:
    """What one task did and where: for the per-worker summary."""

    task: str
    worker: str
    seconds: float
    cells: int


def _is_older_run(out: Path) -> bool:
    """A run made before the marker existed: a cells/ cache and only what a run writes."""
    return (out / "cells").is_dir() and all(p.name in _RUN_NAMES for p in out.iterdir())


def claim_study_dir(out: Path) -> Path:
    """Claim ``out`` for a study (new, empty or an earlier run of ours; never the user's)."""
    import medsec
    from medsec.paths import claim_run_dir

    record = {"format": "medsec-run/1", "medsec": medsec.__version__}
    return claim_run_dir(out, RUN_MARKER, record=record, is_older_run=_is_older_run)


def _here() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _context(study: Study, device: torch.device) -> Any:
    """The study's context in this worker (data loaded, victim trained or loaded)."""
    from medsec.evaluation.study import open_study

    s = study
    return open_study(s.out, s.profile, s.dataset, s.arch, s.seed, device, progress=False)[0]


def _cells(out: Path) -> int:
    return sum(1 for _ in (out / "cells").glob("*.json")) if (out / "cells").is_dir() else 0


@dataclass(frozen=True)
class Resources:
    """What each task declares to Ray and uses: CPUs (= its torch threads) and GPUs."""

    cpus: int
    gpus: float = 0.0

    def enter(self) -> torch.device:
        """Set this worker's torch threads; the device its work runs on."""
        torch.set_num_threads(self.cpus)
        return torch.device("cuda") if self.gpus > 0 else torch.device("cpu")


def victim_task(study: Study, res: Resources) -> TaskReport:
    """Stage 1: train (or load) the study's victim."""
    device = res.enter()
    t0 = time.perf_counter()
    _context(study, device)
    return TaskReport(f"victim {study.label()}", _here(), time.perf_counter() - t0, 0)


def entry_task(study: Study, entry: str, res: Resources, *_after: Any) -> TaskReport:
    """Stage 2: compute one defence entry's cells into the study's cache (``_after``: the
    tasks it waits for)."""
    from medsec.evaluation.study import evaluate_entry, resolve_defences

    device = res.enter()
    t0 = time.perf_counter()
    ctx = _context(study, device)
    (defence,) = resolve_defences(entry)
    evaluate_entry(ctx, defence)
    return TaskReport(f"{entry} {study.label()}", _here(), time.perf_counter() - t0, ctx.computed)


def report_task(study: Study, res: Resources, *_after: Any) -> tuple[Path, TaskReport]:
    """Stage 3: the whole study from its cache (the gate computed here), report written."""
    device = res.enter()
    t0 = time.perf_counter()
    before = _cells(study.out)
    (report,) = run_serial([study], device, progress=False)
    made = _cells(study.out) - before  # the gate's cells: the rest were read back
    done = TaskReport(f"report {study.label()}", _here(), time.perf_counter() - t0, made)
    return report, done


def run_serial(studies: list[Study], device: torch.device, progress: bool) -> list[Path]:
    """Each study in turn, in this process (``medsec reproduce`` as it always was)."""
    from medsec.evaluation.study import reproduce

    return [
        reproduce(
            s.out,
            dataset=s.dataset,
            defences=s.defences,
            arch=s.arch,
            seed=s.seed,
            device=device,
            progress=progress,
            profile=s.profile,
        )
        for s in studies
    ]


def run_ray(
    studies: list[Study],
    *,
    address: str | None = None,
    cpus_per_task: int | None = None,
    gpus_per_task: float = 0.0,
    progress: bool = True,
) -> tuple[list[Path], list[TaskReport]]:
    """The three stages as one graph of Ray tasks (each waits only for what it needs); returns
    the report paths (in ``studies`` order) and what every task did.

    ``cpus_per_task`` defaults to this process's torch threads: training sums gradients in
    an order that depends on the thread count (measured: a tiny victim trained with 1 and
    2 threads differs by 1e-8 in the first epoch's loss and picks another best epoch), so
    only tasks with the serial run's threads give its results bit for bit. Fewer CPUs per
    task run more tasks at once, with results equal up to that rounding."""
    try:
        import ray
    except ImportError as exc:
        raise MedsecError("--executor ray needs Ray: pip install 'medsec[ray]'") from exc
    from tqdm.auto import tqdm

    started = ray.is_initialized()
    if not started:
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
            )
        except (ConnectionError, ValueError, RuntimeError) as exc:
            where = f"at {address}" if address else "locally"
            raise MedsecError(f"cannot start or reach a Ray cluster {where}: {exc}") from exc
    res = Resources(cpus_per_task or torch.get_num_threads(), gpus_per_task)
    opts = {"num_cpus": res.cpus, "num_gpus": res.gpus, "max_retries": RETRIES}
    remote = {fn.__name__: ray.remote(**opts)(fn) for fn in (victim_task, entry_task, report_task)}
    # the whole graph at once: a study's entries wait only for its victim, its report only
    # for its entries, so one study's report overlaps another's attacks
    victims = [remote["victim_task"].remote(s, res) for s in studies]
    entries = [
        [remote["entry_task"].remote(s, e, res, v) for e in s.entries()]
        for s, v in zip(studies, victims, strict=True)
    ]
    reports = [
        remote["report_task"].remote(s, res, v, *e)
        for s, v, e in zip(studies, victims, entries, strict=True)
    ]
    refs = [*victims, *(r for e in entries for r in e), *reports]
    bar = tqdm(total=len(refs), desc="study grid (tasks)", disable=not progress, unit="task")
    results: dict[Any, Any] = {}
    try:
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            results[ready[0]] = ray.get(ready[0])
            bar.update(1)
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None)
        cause = cause if isinstance(cause, MedsecError) else None
        raise cause or MedsecError(f"a study task failed: {exc}") from exc
    finally:
        bar.close()
        if not started:
            ray.shutdown()
    finished = [results[r] for r in reports]
    done = [results[r] for r in refs if r not in reports] + [t for _, t in finished]
    return [p for p, _ in finished], done


def worker_summary(done: list[TaskReport]) -> list[dict[str, Any]]:
    """Per worker: tasks, cells computed and seconds busy (in first-seen order)."""
    rows: dict[str, dict[str, Any]] = {}
    for r in done:
        row = rows.setdefault(r.worker, {"worker": r.worker, "tasks": 0, "cells": 0, "s": 0.0})
        row["tasks"] += 1
        row["cells"] += r.cells
        row["s"] += r.seconds
    return list(rows.values())


def format_summary(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'worker':<28} {'tasks':>5} {'cells':>6} {'busy s':>8}"]
    lines += [f"{r['worker']:<28} {r['tasks']:>5} {r['cells']:>6} {r['s']:>8.0f}" for r in rows]
    return "\n".join(lines)

"""`medsec reproduce`: data -> victim -> each selected defence (non-adaptive, then adaptive)
-> the signature gate over every adversarial image -> report. Resumable: the victim and every
cell are cached in the output directory."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medsec.data import EMBEDDED, load_dataset
from medsec.data.base import Dataset
from medsec.defences import FAMILIES, Defence, get_defence, list_defences
from medsec.errors import MedsecError
from medsec.evaluation.baseline import run_baseline
from medsec.evaluation.context import PROFILES, Profile, StudyContext
from medsec.evaluation.detection import evaluate_detection
from medsec.evaluation.gate import run_gate
from medsec.evaluation.robust import evaluate_robust
from medsec.models import TrainConfig, load_checkpoint, save_checkpoint, train_victim
from medsec.utils import environment_record, seed_everything

Evaluator = Callable[[StudyContext, Defence], list[dict[str, Any]]]
# One generic evaluator per family (the order of the study is the family table's).
EVALUATORS: dict[str, Evaluator] = {
    "none": run_baseline,
    "robustification": evaluate_robust,
    "detection": evaluate_detection,
    "integrity": run_gate,
}


def load_study_data(dataset: str, profile: Profile, seed: int, progress: bool) -> Dataset:
    """Embedded data at the profile's sizes; user data as it comes (resized to the profile)."""
    if dataset in EMBEDDED:
        return load_dataset(
            dataset,
            size=profile.size,
            n_train=profile.n_train,
            n_val=profile.n_val,
            n_test=profile.n_test,
            seed=seed,
            progress=progress,
        )
    return load_dataset(dataset, size=profile.size, seed=seed)


def prepare_victim(
    out: Path,
    data: Dataset,
    profile: Profile,
    arch: str,
    seed: int,
    device: torch.device,
    progress: bool,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train the victim once per (data, arch, profile, seed); later runs load the checkpoint."""
    cfg = TrainConfig(arch=arch, epochs=profile.epochs, patience=profile.patience, seed=seed)
    path = out / "artifacts" / f"victim-{arch}-{data.content_hash[:12]}-e{cfg.epochs}-s{seed}.pt"
    if path.exists():
        try:
            return load_checkpoint(path, device=device, expect_data_hash=data.content_hash)
        except MedsecError:
            path.unlink()  # damaged or stale: retrain rather than trust it
    model, metrics = train_victim(data, cfg, device=device, progress=progress)
    save_checkpoint(
        path,
        model,
        arch=arch,
        data_hash=data.content_hash,
        image_size=data.size,
        metrics=metrics,
        settings=vars(cfg),
    )
    return load_checkpoint(path, device=device, expect_data_hash=data.content_hash)


def resolve_defences(spec: str | None) -> list[Defence]:
    """``None``/``all`` -> every built-in entry; else a comma list of names and plug-ins
    (``FILE.py:NAME`` / ``package.module:NAME``), run in the family table's order (so the
    signature gate, last, sees every adversarial image)."""
    if spec in (None, "", "all"):
        return list_defences()
    names = list(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    if not names:
        raise MedsecError("no defence named")
    chosen = [get_defence(n) for n in names]
    clash = [d.name for d in chosen if sum(o.name == d.name for o in chosen) > 1]
    if clash:
        raise MedsecError(f"two entries are named {clash[0]!r}")
    order = list(FAMILIES)
    return sorted(chosen, key=lambda d: order.index(d.family))


def open_study(
    out: Path,
    profile: Profile,
    dataset: str,
    arch: str,
    seed: int,
    device: torch.device,
    progress: bool,
) -> tuple[StudyContext, dict[str, float]]:
    """The study's context (data loaded, victim trained or loaded) and the seconds each of
    the two took; every process that works on the study starts here."""
    start = time.perf_counter()
    seed_everything(seed)
    data = load_study_data(dataset, profile, seed, progress)
    stages = {"data": time.perf_counter() - start}
    victim, meta = prepare_victim(out, data, profile, arch, seed, device, progress)
    stages["victim"] = time.perf_counter() - start - stages["data"]
    return StudyContext(out, profile, data, victim, meta, device, seed, progress), stages


def evaluate_entry(ctx: StudyContext, defence: Defence) -> list[dict[str, Any]]:
    """One entry's rows through its family's evaluator; a plug-in's own failure becomes a
    one-line error naming it (a bug of ours keeps its traceback)."""
    try:
        return EVALUATORS[defence.family](ctx, defence)
    except (MedsecError, KeyboardInterrupt):
        raise
    except Exception as exc:
        if defence.__module__.startswith("medsec."):
            raise
        raise MedsecError(f"plug-in {defence.name!r} failed: {exc!r}") from exc


def reproduce(
    out: Path,
    *,
    profile_name: str = "full",
    dataset: str = "fundus-lesion",
    defences: str | None = None,
    arch: str = "small-cnn",
    device: torch.device,
    seed: int = 0,
    progress: bool = True,
    profile: Profile | None = None,
) -> Path:
    """Run the study into ``out`` and write the report; returns the report.md path.

    ``profile`` overrides the named profile (tests use tiny ones).
    """
    if profile is None:
        if profile_name not in PROFILES:
            raise MedsecError(f"unknown profile {profile_name!r}; choose {', '.join(PROFILES)}")
        profile = PROFILES[profile_name]
    else:
        profile_name = profile.name
    chosen = resolve_defences(defences)
    names = [d.name for d in chosen]
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ctx, stages = open_study(out, profile, dataset, arch, seed, device, progress)
    ctx.log(f"data {stages['data']:.0f} s, victim {stages['victim']:.0f} s")
    rows: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    for defence in chosen:
        name = defence.name
        t0 = time.perf_counter()
        ctx.log(f"{name}: starting")
        rows += evaluate_entry(ctx, defence)
        timings[name] = time.perf_counter() - t0
        ctx.log(f"{name}: done in {timings[name]:.0f} s ({len(names)} entries in all)")
    from medsec.evaluation.report import write_report

    record = {
        "profile": profile.record(),
        "defences": names,
        "seed": seed,
        "environment": environment_record(device),
        "wall_time_s": time.perf_counter() - start,
        "wall_time_per_entry_s": timings,
        "wall_time_per_stage_s": stages | {"defences": sum(timings.values())},
        "command": f"medsec reproduce --profile {profile_name} --dataset {dataset} "
        f"--defences {defences or 'all'} --arch {arch} --seed {seed}",
    }
    return write_report(ctx, rows, record)


def read_metrics(out: Path) -> dict[str, Any]:
    """Load a finished study's metrics.json."""
    return json.loads((out / "metrics.json").read_text())

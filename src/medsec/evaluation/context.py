"""What every part of the study shares: the profile, data, victim, resumable cells, figures,
validity and outcome checks, and the row format of metrics.json.

A *cell* is one unit of work (e.g. one defence x attack x eps). Its result is a JSON file in
``OUT/cells/``, written atomically; a rerun of a killed study finds it and skips the work.
Cell keys include every setting that changes the result, so a changed setting recomputes.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from medsec.attacks.criteria import Criterion
from medsec.attacks.pgd import AttackSpec
from medsec.attacks.precision import resolve
from medsec.cache import ArtifactStore, cached_cell, jsonable, slug
from medsec.data.base import Dataset
from medsec.defences.base import FAMILIES, BuildEnv
from medsec.errors import MedsecError
from medsec.utils import atomic_write_bytes, seed_everything

EPS_UNIT = "[0,1] pixel units"


@dataclass(frozen=True)
class Profile:
    """Sizes of one study run. eps values are in [0,1] pixel units."""

    name: str
    size: int
    n_train: int
    n_val: int
    n_test: int
    epochs: int
    patience: int
    n_attack: int
    eps: tuple[float, ...]
    batch_size: int = 250
    adaptive_steps: int = 50  # steps of each restart of the adaptive attack on robustification
    detection_steps: int = 30  # steps of each lambda rung of the adaptive attack on detectors
    square_queries: int = 1000  # query budget of the gradient-free Square Attack per image

    def record(self) -> dict[str, Any]:
        rec = asdict(self)
        rec["eps_255"] = [round(e * 255, 3) for e in self.eps]
        return rec


STUDY_EPS = tuple(e / 255 for e in (0.5, 1, 2, 4, 8))
PROFILES: dict[str, Profile] = {
    # a smoke run in minutes (tests, trying out a plug-in): 28 px, few images, two budgets
    "tiny": Profile("tiny", 28, 400, 100, 120, 8, 8, 40, (2 / 255, 8 / 255), 40, 10, 10, 100),
    "quick": Profile("quick", 64, 2000, 300, 400, 20, 6, 200, STUDY_EPS, square_queries=500),
    "full": Profile("full", 64, 4000, 500, 1000, 40, 8, 500, STUDY_EPS),
}


CHECK_KINDS = ("validity", "outcome")


@dataclass
class Check:
    """One check, pass or fail, with what was measured and what was expected.

    ``validity``: the evaluation of this defence can be trusted (the attack did not fail for
    a trivial reason); a defence with a failed validity check gets the verdict
    "inconclusive". ``outcome``: what the study found (a target met or not). ``passed``
    None: the check could not be run (e.g. no image where a binarization test is feasible):
    missing evidence, not a failure (see medsec.evaluation.verdict)."""

    name: str
    passed: bool | None
    detail: str
    defence: str = "none"
    kind: str = "validity"
    measured: Any = None
    expected: str | None = None


@dataclass
class Figure:
    """A figure for the report, filed under its family and (if any) its defence."""

    path: str  # relative to the output directory
    caption: str
    family: str
    defence: str | None = None


@dataclass
class Note:
    """A paragraph for the report (threat model, assumptions, findings), filed like figures."""

    text: str
    family: str
    defence: str | None = None


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact (Clopper-Pearson) 1 - alpha interval of a rate k/n (scipy's beta quantiles)."""
    from scipy.stats import beta

    if n <= 0:
        return 0.0, 1.0
    low = 0.0 if k <= 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k >= n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def rate_ci(rate: float | None, n: int) -> tuple[float | None, float | None]:
    """95% interval of a rate measured on ``n`` images (k = round(rate x n); for a randomised
    pipeline the rate is a mean over repeats and the interval is approximate)."""
    if rate is None or n <= 0:
        return None, None
    return clopper_pearson(round(rate * n), n)


def make_row(
    *,
    defence: str,
    family: str,
    attack: str,
    adaptive: bool,
    eps: float,
    n: int,
    clean_accuracy: float,
    attack_success_rate: float,
    detection_auc: float | None = None,
    tpr_at_5fpr: float | None = None,
    spec: AttackSpec | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A metrics.json row; ``attack_success_rate`` is over the ``n`` attacked images.

    Every row gets the ASR's 95% Clopper-Pearson interval (``ci_low``, ``ci_high``), and
    robust accuracy and the detection rate theirs where present."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {tuple(FAMILIES)}")
    row: dict[str, Any] = {
        "defence": defence,
        "family": family,
        "attack": attack,
        "adaptive": bool(adaptive),
        "eps": float(eps),
        "eps_255": round(float(eps) * 255, 4),
        "n": int(n),
        "clean_accuracy": float(clean_accuracy),
        "attack_success_rate": float(attack_success_rate),
        "detection_auc": None if detection_auc is None else float(detection_auc),
        "tpr_at_5fpr": None if tpr_at_5fpr is None else float(tpr_at_5fpr),
    }
    row["ci_low"], row["ci_high"] = rate_ci(attack_success_rate, n)
    if spec is not None:
        row["settings"] = spec.record()
    row.update(extra)
    if row.get("robust_accuracy") is not None:  # clean accuracy x (1 - ASR): ASR's interval
        worst = row.get("worst_case_asr", attack_success_rate)
        low, high = rate_ci(worst, n)
        row["robust_accuracy_ci"] = [clean_accuracy * (1 - high), clean_accuracy * (1 - low)]
    if tpr_at_5fpr is not None and row.get("tpr_n"):
        row["tpr_ci"] = list(rate_ci(tpr_at_5fpr, int(row["tpr_n"])))
    return jsonable(row)


def _headline(result: Any) -> str:
    """'ASR 0.950, AUC 0.610, ' from a cell's row (or its own ``asr``), if it has one."""
    if not isinstance(result, dict):
        return ""
    row = result.get("row") if isinstance(result.get("row"), dict) else result
    parts = [
        f"{label} {row[k]:.3f}"
        for k, label in (
            ("attack_success_rate", "ASR"),
            ("asr", "ASR"),
            ("detection_auc", "AUC"),
            ("accuracy", "accuracy"),
        )
        if isinstance(row.get(k), float | int)
    ]
    return ", ".join(parts) + (", " if parts else "")


@dataclass
class StudyContext:
    """Shared state of one ``medsec reproduce`` run (see module docstring)."""

    out: Path
    profile: Profile
    data: Dataset
    victim: nn.Module
    victim_meta: dict[str, Any]
    device: torch.device
    seed: int = 0
    progress: bool = True
    checks: list[Check] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    headlines: list[dict[str, Any]] = field(default_factory=list)  # one per judged defence
    computed: int = 0  # cells computed (not read from the cache) by this process

    @property
    def precision(self) -> str:
        """What the attack engine computes its steps in here (fp32 or bf16): in every
        cell's key, as the same attack gives slightly different images in each."""
        return resolve("auto", torch.device(self.device))

    # ---- resumable cells -------------------------------------------------------------
    def cell(self, key: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Return the cached result for ``key`` or compute, store atomically and return it.

        The computation starts from random state seeded by the study seed and the key, so a
        cell never depends on what ran before it in the process (entry order, a resumed run).
        """
        key = {
            **key,
            "data": self.data.content_hash[:16],
            "victim": self.victim_meta.get("sha256", "")[:16],
            "seed": self.seed,
            "engine_precision": self.precision,
        }
        blob = json.dumps(key, sort_keys=True, default=str)
        name = slug(
            "-".join(
                str(v) for k, v in key.items() if k in ("defence", "attack", "eps_255", "what")
            )
        )
        path = self.out / "cells" / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}.json"
        t0 = time.perf_counter()

        def seeded() -> dict[str, Any]:
            seed_everything(int(hashlib.sha256(blob.encode()).hexdigest()[:8], 16))
            return compute()

        result, computed = cached_cell(path, key, seeded, warn=self.log)
        if computed:
            self.computed += 1
            self.log(f"{name}: {_headline(result)}{time.perf_counter() - t0:.1f} s")
        return result

    @property
    def store(self) -> ArtifactStore:
        """Trained artefacts of this (data, victim) pair, in OUT/artifacts."""
        tag = f"{self.data.content_hash[:10]}-{self.victim_meta.get('sha256', '')[:10]}"
        return ArtifactStore(self.out / "artifacts", tag)

    def build_env(self) -> BuildEnv:
        """What a defence's ``build`` may use."""
        return BuildEnv(
            eps=self.profile.eps,
            seed=self.seed,
            device=self.device,
            batch_size=self.profile.batch_size,
            store=self.store,
        )

    def log(self, line: str) -> None:
        """One line of progress (kept clear of progress bars; silent when progress is off)."""
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(line, file=sys.stderr)

    def artifact(self, name: str) -> Path:
        """Path for a cached artefact (a trained defence, adversarial images) in OUT/artifacts."""
        path = self.out / "artifacts" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # ---- data for attacks ------------------------------------------------------------
    def attack_set(
        self, pipeline: nn.Module | None = None, n: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The first ``n`` test images the pipeline classifies correctly when clean.

        Returns (x, y, test_indices). Attack success rates are measured on these, so a
        misclassified clean image never counts as an attack success.
        """
        pipeline = pipeline if pipeline is not None else self.victim
        n = n if n is not None else self.profile.n_attack
        x = torch.from_numpy(self.data.test.images)
        y = torch.from_numpy(self.data.test.labels)
        keep: list[Tensor] = []
        found = 0
        for s in range(0, len(x), self.profile.batch_size):
            xb = x[s : s + self.profile.batch_size].to(self.device)
            ok = (
                Criterion(pipeline, y[s : s + len(xb)].to(self.device)).predict(xb).cpu()
                == y[s : s + len(xb)]
            )
            idx = torch.nonzero(ok)[:, 0] + s
            keep.append(idx)
            found += len(idx)
            if found >= n:
                break
        idx = torch.cat(keep)[:n] if keep else torch.zeros(0, dtype=torch.long)
        if len(idx) == 0:
            raise MedsecError("the pipeline classifies no test image correctly; nothing to attack")
        return x[idx], y[idx], idx

    def clean_accuracy(self, pipeline: nn.Module) -> float:
        """Accuracy of a pipeline on the whole test split."""
        x = torch.from_numpy(self.data.test.images)
        y = torch.from_numpy(self.data.test.labels)
        correct = 0
        for s in range(0, len(x), self.profile.batch_size):
            xb = x[s : s + self.profile.batch_size].to(self.device)
            pred = Criterion(pipeline, y[s : s + len(xb)]).predict(xb).cpu()
            correct += int((pred == y[s : s + len(xb)]).sum())
        return correct / len(x)

    def save_adversarial(
        self,
        name: str,
        x_adv: Tensor,
        test_indices: Tensor,
        success: Tensor,
        *,
        defence: str | None = None,
        attack: str | None = None,
        eps: float | None = None,
        adaptive: bool = False,
    ) -> Path:
        """Keep adversarial images (and which test images they came from) for the signature
        gate, which checks every one. Stored as float32 .npz in OUT/artifacts/adversarial/."""
        import io

        path = self.artifact(f"adversarial/{slug(name)}.npz")
        meta = {
            "name": name,
            "defence": defence,
            "attack": attack,
            "eps": eps,
            "adaptive": adaptive,
        }
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            x_adv=x_adv.detach().cpu().numpy().astype(np.float32),
            test_indices=test_indices.cpu().numpy(),
            success=success.cpu().numpy(),
            meta=json.dumps(meta),
        )
        atomic_write_bytes(path, buf.getvalue())
        return path

    def progress_iter(self, items: list[Any], desc: str) -> Any:
        """A progress bar over ``items`` (silent when progress is off)."""
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, disable=not self.progress, leave=False)

    # ---- report material -------------------------------------------------------------
    def add_check(
        self,
        name: str,
        passed: bool | None,
        detail: str,
        *,
        kind: str,
        defence: str = "none",
        measured: Any = None,
        expected: str | None = None,
    ) -> None:
        """A validity or outcome check (see :class:`Check`) for the report."""
        if kind not in CHECK_KINDS:
            raise ValueError(f"kind must be one of {CHECK_KINDS}")
        self.checks.append(
            Check(
                name,
                None if passed is None else bool(passed),
                detail,
                defence,
                kind,
                jsonable(measured),
                expected,
            )
        )

    def figure_path(self, name: str) -> Path:
        path = self.out / "figures" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def add_figure(
        self, path: Path, caption: str, *, family: str, defence: str | None = None
    ) -> None:
        """A figure for the report, under its family (and defence; None = family-wide)."""
        rel = str(path.relative_to(self.out))
        if not any(f.path == rel for f in self.figures):
            self.figures.append(Figure(rel, caption, family, defence))

    def add_note(self, text: str, *, family: str, defence: str | None = None) -> None:
        """A paragraph for the report, filed like figures (a repeated note is kept once)."""
        note = Note(text, family, defence)
        if note not in self.notes:
            self.notes.append(note)

    def add_headline(self, record: dict[str, Any]) -> None:
        """The same-eps record of a defence at its working budget (evaluation/headline.py);
        a rerun of the defence replaces its record."""
        self.headlines[:] = [h for h in self.headlines if h["defence"] != record["defence"]]
        self.headlines.append(record)

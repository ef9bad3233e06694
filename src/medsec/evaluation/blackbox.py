"""The gradient-free cross-check of every defence: Square Attack (Andriushchenko et al. 2020)
behind the one Criterion, on the first images of the defence's attack set, at the eps of
the headline diagnostics.

A gradient attack that is clearly weaker than a random search that never sees a gradient
failed for its own reasons (masked, noisy or misleading gradients): white-box ASR whose
95% interval lies below Square's ASR on the same images is a validity failure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch import Tensor

from medsec.attacks import run_square
from medsec.attacks.criteria import majority, success_runs
from medsec.defences.base import Deployed
from medsec.evaluation.context import StudyContext, rate_ci

ObjectiveFactory = Callable[[Tensor, Tensor], Any]


def square_cell(
    ctx: StudyContext,
    name: str,
    dep: Deployed | None,
    x: Tensor,
    y: Tensor,
    eps: float,
    key: dict[str, Any],
    *,
    detector: Any = None,
    objective_factory: ObjectiveFactory | None = None,
) -> dict[str, Any]:
    """Square on ``dep``'s deployed pipeline (the victim with ``detector`` where ``dep`` is
    None); success re-predicted like the white-box attack's (majority of repeats)."""
    pipeline = ctx.victim if dep is None else dep.pipeline
    queries = ctx.profile.square_queries

    def compute() -> dict[str, Any]:
        if dep is not None and dep.reseed is not None:
            dep.reseed(ctx.seed)
        res = run_square(
            pipeline,
            x,
            y,
            eps,
            queries,
            detector=detector,
            objective_factory=objective_factory,
            batch_size=ctx.profile.batch_size,
            seed=ctx.seed,
        )
        runs = success_runs(
            pipeline,
            res.x_adv,
            y,
            detector=detector,
            repeats=1 if dep is None else dep.repeats,
            reseed=None if dep is None else dep.reseed,
            seed=ctx.seed,
            batch_size=ctx.profile.batch_size,
        )
        final = majority(runs)
        return {
            "asr": float(final.float().mean()),
            "success": final.tolist(),
            "queries": queries,
            "seconds": res.seconds,
        }

    full = {"defence": name, "what": "square", "eps_255": round(eps * 255, 4), "n": len(x)}
    return ctx.cell({**full, **key, "queries": queries}, compute)


def square_check(
    ctx: StudyContext, name: str, white_box: list[bool], square: dict[str, Any], eps: float
) -> None:
    """Validity: the white-box attack is not clearly weaker than Square on the same images."""
    n = len(white_box)
    wb = float(np.mean(white_box)) if n else 0.0
    low, high = rate_ci(wb, n)
    sq = square["asr"]
    only_square = int(np.sum(np.asarray(square["success"], bool) & ~np.asarray(white_box, bool)))
    ctx.add_check(
        f"{name}: white-box attack not weaker than the gradient-free Square Attack",
        high is None or high >= sq,
        f"at {eps * 255:g}/255 on {n} images: white-box ASR {wb:.3f} [{low:.3f}, {high:.3f}], "
        f"Square ({square['queries']} queries) {sq:.3f}; images only Square fooled: "
        f"{only_square}",
        kind="validity",
        defence=name,
        measured={"white_box": wb, "square": sq},
        expected="white-box 95% interval reaches Square's ASR",
    )

"""The gradient-free cross-check of every defence: Square Attack (Andriushchenko et al. 2020)
behind the one Criterion, on the first images of the defence's attack set, at the eps of
the headline diagnostics.

A gradient attack that is clearly weaker than a random search that never sees a gradient
failed for its own reasons (masked, noisy or misleading gradients). Both run on the same
images, so "clearly weaker" is a paired question: of the images only one attack fooled, did
Square take significantly more (exact one-sided McNemar test, i.e. a binomial test on the
discordant pairs, at ``ALPHA``)? It is stricter than asking whether the white-box rate's 95%
interval reaches Square's rate (on 48 images, 10 white-box vs the same 10 + 6 by Square:
the interval [0.10, 0.35] reaches 0.33; the paired test, p = 0.016, does not).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.stats import binomtest
from torch import Tensor

from medsec.attacks import run_square
from medsec.attacks.criteria import majority, success_runs
from medsec.defences.base import Deployed
from medsec.evaluation.context import StudyContext, rate_ci

ObjectiveFactory = Callable[[Tensor, Tensor], Any]
ALPHA = 0.05


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
    if detector is None and dep is not None:
        detector = dep.detector  # a robustification defence's reject option, if any
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
    """Validity: Square does not fool significantly more of the same images than the
    white-box attack (exact one-sided McNemar test at ``ALPHA``)."""
    wb_hit = np.asarray(white_box, bool)
    sq_hit = np.asarray(square["success"], bool)[: len(wb_hit)]
    n = len(wb_hit)
    wb = float(wb_hit.mean()) if n else 0.0
    low, high = rate_ci(wb, n)
    only_square, only_wb = int(np.sum(sq_hit & ~wb_hit)), int(np.sum(wb_hit & ~sq_hit))
    p = (
        binomtest(only_square, only_square + only_wb, 0.5, alternative="greater").pvalue
        if (only_square + only_wb)
        else 1.0
    )
    ctx.add_check(
        f"{name}: white-box attack not weaker than the gradient-free Square Attack",
        p >= ALPHA,
        f"at {eps * 255:g}/255 on {n} images: white-box ASR {wb:.3f} [{low:.3f}, {high:.3f}], "
        f"Square ({square['queries']} queries) {square['asr']:.3f}; images only Square fooled: "
        f"{only_square}, only white-box: {only_wb} (one-sided exact McNemar p = {p:.3g})",
        kind="validity",
        defence=name,
        measured={
            "white_box": wb,
            "square": square["asr"],
            "only_square": only_square,
            "only_white_box": only_wb,
            "p_value": p,
        },
        expected=f"Square not significantly stronger on the same images (p >= {ALPHA})",
    )

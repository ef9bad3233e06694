"""Validity evidence of the detection evaluator for any detector: the indicators of attack
failure of each lambda-ladder run, the unconstrained (eps = 1) attack with the detector in
the criterion, and the gradient-free Square Attack cross-check."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from medsec.attacks import AttackSpec, Objective, margin
from medsec.defences.base import Deployed
from medsec.defences.detection.adaptive import (
    KAPPA,
    LAMBDAS,
    LadderResult,
    features_forward,
    lambda_ladder_attack,
    runner_up,
)
from medsec.evaluation import attack_tests, blackbox
from medsec.evaluation import indicators as ind
from medsec.evaluation.context import StudyContext

N_UNBOUNDED = 48  # images for the unconstrained (eps = 1) attack and for Square


def informed_attack(
    ctx: StudyContext,
    name: str,
    f: Any,
    x: Tensor,
    y: Tensor,
    eps: float,
    start: tuple[Tensor, Tensor] | None = None,
    unconstrained: bool = False,
) -> LadderResult:
    """The informed attacker against fitted detector ``f``: the lambda ladder (targeted
    margin(kappa) + the detector terms) at the attacker's aim, ``start`` = plain results;
    ``unconstrained``: the same attack with its eps constraint removed."""
    spec = AttackSpec(
        f"adaptive-{name}",
        eps,
        steps=ctx.profile.detection_steps,
        loss="margin",
        kappa=KAPPA,
        targeted=True,
    )
    if unconstrained:
        spec = spec.unconstrained()
    return lambda_ladder_attack(
        ctx.victim,
        f.detector,
        x,
        y,
        spec,
        f.terms,
        batch_size=ctx.profile.batch_size,
        seed=ctx.seed,
        aim=f.aim,
        start=start,
    )


def indicators(
    ctx: StudyContext, x: Tensor, y: Tensor, res: Any, final: Tensor
) -> list[dict[str, Any]]:
    """Indicators of attack failure of one lambda-ladder run (transfer: the loop's criterion
    is the deployed detector itself, at a stricter aim, so there is no view to transfer
    from)."""
    spread = ind.objective_spread(
        ctx.victim, x, res.x_adv, y, res.spec.eps, seed=ctx.seed, batch_size=ctx.profile.batch_size
    )
    found = [
        ind.silent_success(res.loop_success, final),
        ind.incomplete(res.late_gain, final),
        ind.transfer_failure(None, final),
        ind.unavailable(res.unavailable_grad),
        ind.unstable(spread, mitigated=False),
    ]
    return [i.record() for i in found]


def unconstrained(
    ctx: StudyContext, name: str, f: Any, x: Tensor, y: Tensor, eps: float
) -> dict[str, Any]:
    """The adaptive attack at ``eps`` with its constraint removed (eps = 1, any image
    reachable; steps as at ``eps``), detector included, on the first ``N_UNBOUNDED``
    attacked images."""
    xs, ys = x[:N_UNBOUNDED], y[:N_UNBOUNDED]

    def compute() -> dict[str, Any]:
        res = informed_attack(ctx, name, f, xs, ys, eps, unconstrained=True)
        return {"asr": float(res.success.float().mean()), "n": len(xs)}

    key = {"defence": name, "what": "adaptive-unbounded", "eps_255": 255, "n": len(xs)}
    key.update(steps=ctx.profile.detection_steps, lambdas=LAMBDAS, kappa=KAPPA)
    key.update(steps_of_eps_255=round(eps * 255, 4), start="clean image")
    cell = ctx.cell(key, compute)
    return ind.unconstrained(cell["asr"], cell["n"]).record()


def square(
    ctx: StudyContext, name: str, f: Any, x: Tensor, y: Tensor, adaptive: Any, eps: float
) -> dict[str, Any]:
    """Square with the informed attacker's objective (targeted margin + the detector terms)
    against the victim AND the detector, vs the white-box result on the same images; returns
    the Square cell."""
    xs, ys = x[:N_UNBOUNDED], y[:N_UNBOUNDED]
    targets = runner_up(ctx.victim, xs, ctx.profile.batch_size).to(ctx.device)
    weighted = [(1.0, margin(KAPPA)), *f.terms]
    forward = features_forward(ctx.victim)

    def factory(_labels: Tensor, idx: Tensor) -> Objective:
        return Objective(forward, weighted, targets[idx.to(targets.device)], targeted=True)

    key = {"steps": "-", "kappa": KAPPA, "terms": f.terms_desc, "aim": "deployed threshold"}
    sq = blackbox.square_cell(
        ctx, name, None, xs, ys, eps, key, detector=f.detector, objective_factory=factory
    )
    white_box = np.load(ctx.out / adaptive["adversarial"])["success"][: len(xs)]
    blackbox.square_check(ctx, name, np.asarray(white_box, bool).tolist(), sq, eps)
    return sq


def binarization(
    ctx: StudyContext, name: str, f: Any, x: Tensor, y: Tensor, eps: float, key: dict[str, Any]
) -> None:
    """The binarization test of the informed attacker (the lambda ladder at the aim) on the
    victim whose head is replaced by the readout, the detector in the success criterion."""

    def attack(xs: Tensor, ys: Tensor) -> Tensor:
        return informed_attack(ctx, name, f, xs, ys, eps).x_adv

    dep = Deployed(ctx.victim, detector=f.detector)
    attack_tests.binarization(ctx, name, dep, (x, y), eps, attack, key)

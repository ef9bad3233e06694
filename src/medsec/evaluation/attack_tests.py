"""Attack unit tests for any Defence: the gradient-free
Square Attack cross-check, the binarization test (Zimmermann et al. 2022) of the defence's
own adaptive attack, and - for a defence that certifies - its certificate against an L2
attack (the negative control: the attacker must fail inside the guarantee)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from medsec.defences.base import Deployed
from medsec.evaluation import blackbox
from medsec.evaluation.binarization import GIVE_UP_AFTER, PASS_RATE, binarization_test
from medsec.evaluation.certificates import certificate_check
from medsec.evaluation.context import StudyContext

N_SQUARE = 48  # images for Square (half for randomised pipelines: EOT multiplies the cost)
N_BINARIZE = 20  # images for the binarization test
N_INNER = 999  # inner points per image (the paper's); 199 for randomised pipelines
Attack = Callable[[Tensor, Tensor], Tensor]


def evidence(
    ctx: StudyContext,
    name: str,
    dep: Deployed,
    attacked: tuple[Tensor, Tensor],
    white_box: list[bool],
    eps: float,
    attack: Attack,
    key: dict[str, Any],
) -> dict[str, Any]:
    """Square, binarization and (if ``dep.certify``) certificate checks at ``eps``;
    ``white_box`` is the informed attacker's per-image success on ``attacked`` images, and
    ``attack(x, y) -> x_adv`` the adaptive attack itself; ``key`` identifies the defence.
    Returns the Square cell (its ``asr`` and per-image ``success``)."""
    x, y = attacked
    randomised = dep.repeats > 1
    n_sq = N_SQUARE // 2 if randomised else N_SQUARE
    square = blackbox.square_cell(ctx, name, dep, x[:n_sq], y[:n_sq], eps, key)
    blackbox.square_check(ctx, name, white_box[:n_sq], square, eps)

    binarization(ctx, name, dep, (x, y), eps, attack, key)
    if dep.certify is not None:
        _certificate(ctx, name, dep, x, y, key)
    return square


def binarization(
    ctx: StudyContext,
    name: str,
    dep: Deployed,
    attacked: tuple[Tensor, Tensor],
    eps: float,
    attack: Attack,
    key: dict[str, Any],
) -> None:
    """The binarization test of ``attack`` on the first images of ``attacked``, as a
    validity check (a detector in ``dep`` stays in the success criterion)."""
    x, y = attacked
    nb, n_inner = min(len(x), N_BINARIZE), (199 if dep.repeats > 1 else N_INNER)
    bt = ctx.cell(
        {"defence": name, "what": "binarization", "n": nb, "n_inner": n_inner, **key}
        | {"give_up_after": GIVE_UP_AFTER},
        lambda: binarization_test(
            dep, x[:nb], y[:nb], eps, attack, n_inner=n_inner, n_boundary=1, seed=ctx.seed
        ),
    )
    rate = bt["pass_rate"]
    ctx.add_check(
        f"{name}: binarization test of the adaptive attack (pass rate >= {PASS_RATE})",
        bt["passed_threshold"],  # None: no image feasible, the test could not be run
        f"at {eps * 255:g}/255: {bt['n_tested']} of {bt['n_images']} images feasible "
        f"({bt['n_infeasible']} infeasible"
        + (f", {bt['n_not_tried']} not tried after that" if bt.get("n_not_tried") else "")
        + "); the attack found the planted adversarial "
        + ("on none (nothing feasible)" if rate is None else f"on {rate:.3f}")
        + f" ({n_inner} inner points per image)",
        kind="validity",
        defence=name,
        measured=rate,
        expected=f">= {PASS_RATE}",
    )


def _certificate(
    ctx: StudyContext, name: str, dep: Deployed, x: Tensor, y: Tensor, key: dict[str, Any]
) -> None:
    """The negative control: no adversarial example inside the certified L2 radius, some
    well beyond it (else the L2 attack itself is broken)."""
    steps = ctx.profile.adaptive_steps
    cert = ctx.cell(
        {"defence": name, "what": "certificate", "steps": steps, "eot": dep.eot, **key},
        lambda: certificate_check(
            dep, x, y, steps=steps, eot=dep.eot, seed=ctx.seed, batch_size=ctx.profile.batch_size
        ),
    )
    inside, beyond = cert["inside"], cert["beyond"]
    ctx.add_check(
        f"{name}: certificate holds against the L2 attack (0 adversarial examples inside the "
        "certified radius)",
        cert["violations"] == 0,
        f"{cert['certified_correct']} of {cert['n']} images certified correct (median radius "
        f"{cert['radius'].get('median')}); inside {inside['eps_over_radius']} x radius: "
        f"{inside['adversarial']} adversarial; violations {cert['violations']}",
        kind="validity",
        defence=name,
        measured=cert["violations"],
        expected="0",
    )
    ctx.add_check(
        f"{name}: the L2 attack succeeds beyond the certified radius",
        beyond["attacked"] == 0 or beyond["adversarial"] > 0,
        f"at {beyond['eps_over_radius']} x radius: {beyond['adversarial']} of "
        f"{beyond['attacked']} certified images made adversarial (confirmed by CERTIFY)",
        kind="validity",
        defence=name,
        measured=beyond["adversarial_rate"],
        expected="> 0",
    )

"""The undefended victim (`none`): the study's attack grid and the sanity checks that make an
attack-success claim trustworthy (Carlini et al. 2019; ../reference/evaluation.md)."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch

from medsec.attacks import AttackSpec, Criterion, preset, run_attack
from medsec.defences.base import Defence
from medsec.evaluation.context import StudyContext, make_row
from medsec.evaluation.figures import plot_asr_vs_eps, plot_examples

GRID_ATTACKS = ("fgsm", "bim", "pgd-20", "pgd-100", "cw-linf")
STEPS_TOLERANCE = 0.03  # |ASR(PGD-100) - ASR(PGD-20)| and restarts: "changes little"

FAMILY = "none"


def attack_cell(
    ctx: StudyContext, spec: AttackSpec, *, defence: str = "none", what: str = "grid"
) -> dict[str, Any]:
    """Run one attack on the victim's attack set (cached); keeps per-example success."""
    x, y, idx = ctx.attack_set()

    def compute() -> dict[str, Any]:
        res = run_attack(ctx.victim, x, y, spec, batch_size=ctx.profile.batch_size, seed=ctx.seed)
        ctx.save_adversarial(
            f"{defence}-{what}-{spec.name}-{spec.eps * 255:g}",
            res.x_adv,
            idx,
            res.success,
            defence=defence,
            attack=spec.name,
            eps=spec.eps,
        )
        linf = float((res.x_adv - x).abs().flatten(1).amax(1).max()) if len(x) else 0.0
        return {
            "asr": float(res.success.float().mean()),
            "success": res.success.tolist(),
            "seconds": res.seconds,
            "grad_norm_mean": res.grad_norm_mean,
            "zero_grad_fraction": res.zero_grad_fraction,
            "nonfinite_grad_fraction": res.nonfinite_grad_fraction,
            "gradient_precision": res.precision,
            "max_linf": linf,
            "loss_curve": res.loss_curve[:200],
        }

    key = {
        "defence": defence,
        "attack": spec.name,
        "eps_255": round(spec.eps * 255, 4),
        "what": what,
        "spec": spec.record(),
        "n": len(x),
    }
    return ctx.cell(key, compute)


def run_baseline(ctx: StudyContext, defence: Defence) -> list[dict[str, Any]]:
    """Attack grid (FGSM, BIM, PGD-20, PGD-100, CW-L-inf x eps) plus sanity checks."""
    clean_acc = float(ctx.victim_meta["metrics"]["clean_accuracy"])
    rows: list[dict[str, Any]] = []
    cells: dict[tuple[str, float], dict[str, Any]] = {}
    specs = [preset(a, e) for a in GRID_ATTACKS for e in ctx.profile.eps]
    for spec in ctx.progress_iter(specs, "attacks on the undefended victim"):
        cell = attack_cell(ctx, spec)
        cells[(spec.name, spec.eps)] = cell
        rows.append(
            make_row(
                defence="none",
                family=FAMILY,
                attack=spec.name,
                adaptive=False,
                eps=spec.eps,
                n=len(cell["success"]),
                clean_accuracy=clean_acc,
                attack_success_rate=cell["asr"],
                spec=spec,
                seconds=cell["seconds"],
            )
        )
    for eps in ctx.profile.eps:  # per-example worst case over every attack
        worst = np.any([cells[(a, eps)]["success"] for a in GRID_ATTACKS], axis=0)
        rows.append(
            make_row(
                defence="none",
                family=FAMILY,
                attack="worst-case",
                adaptive=False,
                eps=eps,
                n=len(worst),
                clean_accuracy=clean_acc,
                attack_success_rate=float(worst.mean()),
                over=list(GRID_ATTACKS),
            )
        )
    _sanity(ctx, cells)
    path = ctx.figure_path("asr_vs_eps_none.png")
    plot_asr_vs_eps(
        path,
        {a: [(e, cells[(a, e)]["asr"]) for e in ctx.profile.eps] for a in GRID_ATTACKS},
        "Undefended victim: attack success vs budget",
    )
    ctx.add_figure(
        path,
        "Attack success rate of each attack against the undefended victim as "
        "the L-inf budget grows (eps in /255 of the [0,1] pixel range).",
        family=FAMILY,
        defence=defence.name,
    )
    _examples_figure(ctx, defence.name)
    return rows


def _decreases(curve: list[tuple[float, float]]) -> list[str]:
    return [
        f"{v1:.3f} at {e1 * 255:g} > {v2:.3f} at {e2 * 255:g}"
        for (e1, v1), (e2, v2) in itertools.pairwise(curve)
        if v1 > v2
    ]


def _sanity(ctx: StudyContext, cells: dict[tuple[str, float], dict[str, Any]]) -> None:
    eps = ctx.profile.eps
    # The budget curve must not fall for the iterative attacks (a fall means masking or a
    # bug). Single-step FGSM may legitimately overshoot at large eps; shown, not judged.
    iterative = [a for a in GRID_ATTACKS if a != "fgsm"]
    bad = [
        f"{a}: {d}" for a in iterative for d in _decreases([(e, cells[(a, e)]["asr"]) for e in eps])
    ]
    fgsm = _decreases([(e, cells[("fgsm", e)]["asr"]) for e in eps])
    ctx.add_check(
        "ASR non-decreasing in eps",
        not bad,
        kind="validity",
        measured=len(bad),
        expected="0 decreases of an iterative attack",
        detail=(
            "; ".join(bad)
            or f"{', '.join(iterative)} monotone over {[round(e * 255, 2) for e in eps]}/255"
        )
        + (f"; single-step FGSM overshoots (not judged): {'; '.join(fgsm)}" if fgsm else ""),
    )

    top = max(eps)
    unbounded = attack_cell(ctx, preset("pgd-20", top).unconstrained(), what="unbounded")
    ctx.add_check(
        "unbounded attack reaches 100%",
        unbounded["asr"] == 1.0,
        kind="validity",
        measured=unbounded["asr"],
        expected="1.0",
        detail=f"PGD-20 at eps = 1 (whole pixel range; steps as at {top * 255:g}/255, from the "
        f"clean image): ASR {unbounded['asr']:.3f}",
    )

    worse = [
        f"{e * 255:g}/255: PGD-20 {cells[('pgd-20', e)]['asr']:.3f} < FGSM "
        f"{cells[('fgsm', e)]['asr']:.3f}"
        for e in eps
        if cells[("pgd-20", e)]["asr"] < cells[("fgsm", e)]["asr"]
    ]
    per_example = sum(
        int(
            np.sum(
                np.array(cells[("fgsm", e)]["success"]) & ~np.array(cells[("pgd-20", e)]["success"])
            )
        )
        for e in eps
    )
    ctx.add_check(
        "iterative >= single-step",
        not worse,
        kind="validity",
        measured=per_example,
        expected="PGD-20 ASR >= FGSM ASR at every eps",
        detail=("; ".join(worse) or "PGD-20 >= FGSM at every eps")
        + f"; examples where FGSM succeeds but PGD-20 fails: {per_example}",
    )

    diffs = {e: abs(cells[("pgd-100", e)]["asr"] - cells[("pgd-20", e)]["asr"]) for e in eps}
    mid = eps[len(eps) // 2]
    restarts = attack_cell(ctx, preset("pgd-20", mid, restarts=5), what="restarts")
    d_restart = abs(restarts["asr"] - cells[("pgd-20", mid)]["asr"])
    ctx.add_check(
        "more steps / restarts change little",
        max(diffs.values()) <= STEPS_TOLERANCE and d_restart <= STEPS_TOLERANCE,
        kind="validity",
        measured=max(*diffs.values(), d_restart),
        expected=f"<= {STEPS_TOLERANCE}",
        detail=f"tolerance {STEPS_TOLERANCE:.2f}; max |PGD-100 - PGD-20| = "
        f"{max(diffs.values()):.3f}; |5 restarts - 1| at {mid * 255:g}/255 = "
        f"{d_restart:.3f}",
    )

    grads = [cells[(a, e)] for a in ("pgd-20", "pgd-100", "cw-linf", "bim") for e in eps]
    zero = max(c["zero_grad_fraction"] for c in grads)
    nonfinite = max(c["nonfinite_grad_fraction"] for c in grads)
    ctx.add_check(
        "no zero or NaN gradients",
        zero == 0 and nonfinite == 0,
        kind="validity",
        measured=max(zero, nonfinite),
        expected="0",
        detail=f"largest fraction of examples with an all-zero input gradient {zero:.3f}, "
        f"with a non-finite one {nonfinite:.3f} (first step of every iterative attack)",
    )

    noise = _random_noise_asr(ctx, mid)
    ctx.add_check(
        "white-box >= random noise",
        cells[("pgd-20", mid)]["asr"] >= noise,
        kind="validity",
        measured=cells[("pgd-20", mid)]["asr"] - noise,
        expected=">= 0",
        detail=f"at {mid * 255:g}/255: PGD-20 {cells[('pgd-20', mid)]['asr']:.3f} vs random "
        f"sign noise {noise:.3f}",
    )


def _random_noise_asr(ctx: StudyContext, eps: float) -> float:
    x, y, _ = ctx.attack_set()

    def compute() -> dict[str, Any]:
        gen = torch.Generator().manual_seed(ctx.seed)
        noisy = (x + eps * torch.sign(torch.rand(x.shape, generator=gen) - 0.5)).clamp(0, 1)
        ok = Criterion(ctx.victim, y.to(ctx.device))(noisy.to(ctx.device))
        return {"asr": float(ok.float().mean())}

    return ctx.cell(
        {
            "defence": "none",
            "attack": "random-sign-noise",
            "eps_255": round(eps * 255, 4),
            "what": "noise",
            "n": len(x),
        },
        compute,
    )["asr"]


def _examples_figure(ctx: StudyContext, name: str) -> None:
    """Clean / adversarial / amplified perturbation panels for PGD-20."""
    x, y, _ = ctx.attack_set(n=4)
    panels = []
    for eps in ctx.profile.eps[-3:]:
        res = run_attack(ctx.victim, x, y, preset("pgd-20", eps), seed=ctx.seed)
        crit = Criterion(ctx.victim, y.to(ctx.device))
        panels.append((eps, res.x_adv, crit.predict(res.x_adv.to(ctx.device)).cpu()))
    path = ctx.figure_path("examples_none.png")
    plot_examples(path, x, y, panels, ctx.data.class_names)
    ctx.add_figure(
        path,
        "Clean test images, PGD-20 adversarial versions at three budgets, and "
        "the perturbation amplified to the full range; titles give the victim's "
        "prediction.",
        family=FAMILY,
        defence=name,
    )

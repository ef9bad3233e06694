"""The generic evaluator of the robustification family: any Defence -> rows, checks, notes,
figures.

Per defence: (1) build it (trained once, cached), (2) evaluate it non-adaptively with its
paper's own attacks and compare with the undefended victim under the same attack, (3) probe
it (zero gradients, randomness) and adapt the attack where the defence declared nothing,
(4) attack the whole deployed pipeline adaptively (margin loss, many steps, restarts; EOT
and BPDA where called for; success re-predicted through the deployed pipeline, repeated for
randomised ones), (5) run the gradient-masking diagnostics (medsec.evaluation.robust_checks).

Robust accuracy = clean test accuracy x (1 - per-example worst-case ASR), the ASR being
measured on the first n test images the deployed pipeline classifies correctly.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
from torch import Tensor

from medsec.attacks import (
    AttackSpec,
    preset,
)
from medsec.defences.base import Defence
from medsec.evaluation import attack_tests, headline, robust_checks
from medsec.evaluation.context import StudyContext, make_row
from medsec.evaluation.probe import probe_and_adapt
from medsec.evaluation.robust_cells import (
    RESTARTS,
    STEP_FACTORS,
    adaptive_attack,
    adaptive_spec,
    attack_cell,
    reference_cell,
    rejected,
    spec_key,
    train_id,
)

FAMILY = "robustification"
N_CAP = 200  # attacked images per defence and eps (CPU budget)
# ... and at the paper's working budget, where the headline verdict is judged: a 95%
# Clopper-Pearson interval of +-0.05 at worst (ASR 0.5) needs ~400 images
N_HEADLINE = 400
EOT_SAMPLES = 10  # for randomised plug-ins found by the probe
REPEATS = 5


def threat_model(steps: int) -> str:
    """The family's threat-model paragraph for the report."""
    return (
        "Robustification threat model: a white-box attacker who knows the architecture, the "
        "weights, every preprocessing step and the defence's randomness (its distribution, not the "
        "draws) and changes the pixels of the stored image within an L-inf ball, eps in [0,1] "
        "pixel units. Adaptive attack = the engine's PGD with "
        f"the margin loss, {steps} steps x {RESTARTS} restarts (alpha = f x eps / steps, f = "
        f"{', '.join(f'{f:g}' for f in STEP_FACTORS)} in turn: restarts attack only the failures; "
        "large steps beat a rugged loss surface where small ones stall), through the whole "
        "deployed pipeline; a randomised pipeline is attacked with EOT and its success "
        "re-predicted several times (mean +- std; an image counts when it fools the majority of "
        f"evaluations); a step without a useful gradient is replaced by BPDA. Images attacked per "
        f"defence: the first {N_CAP} ({N_HEADLINE} at its paper's working budget; fewer where a "
        "defence caps it) test images it classifies correctly."
    )


def evaluate_robust(ctx: StudyContext, defence: Defence) -> list[dict[str, Any]]:
    """Rows of one robustification defence; checks, notes and figures go to ``ctx``."""
    name = defence.name
    steps = ctx.profile.adaptive_steps
    ctx.add_note(threat_model(steps), family=FAMILY)
    dep = defence.build(ctx.victim, ctx.data, ctx.build_env())
    if dep.reseed is not None:
        dep.reseed(ctx.seed)
    clean_cell = ctx.cell(
        {"defence": name, "what": "clean", "train": train_id(dep), "reject": "rate"},
        lambda: {"accuracy": ctx.clean_accuracy(dep.pipeline), "reject_rate": rejected(ctx, dep)},
    )
    clean = clean_cell["accuracy"]
    if dep.detector is not None:
        ctx.add_note(
            f"{name}: its reject option refuses {clean_cell['reject_rate']:.3f} of clean test "
            "images (threshold fixed on validation images); an attack succeeds only on an "
            "image it does not refuse",
            family=FAMILY,
            defence=name,
        )
    if dep.reseed is not None:
        dep.reseed(ctx.seed)
    cap = min(dep.max_images or N_CAP, N_CAP, ctx.profile.n_attack)
    cap_w = min(dep.max_images or N_HEADLINE, N_HEADLINE, ctx.profile.n_attack)
    xa, ya, ida = ctx.attack_set(dep.pipeline, max(cap, cap_w))
    x, y, idx = xa[:cap], ya[:cap], ida[:cap]

    def images(eps: float) -> tuple[Tensor, Tensor, Tensor]:
        """The attacked images at ``eps``: more at the paper's working budget."""
        k = cap_w if defence.working_eps and abs(eps - defence.working_eps) < 1e-12 else cap
        return xa[:k], ya[:k], ida[:k]

    rows: list[dict[str, Any]] = []
    base = {"defence": name, "family": FAMILY, "clean_accuracy": clean}

    non: dict[float, list[dict[str, Any]]] = {}
    gains: dict[str, float] = {}
    # a defence that names no attack of its own is first met by plain white-box PGD-20, as a
    # defence-unaware evaluation would (where gradients are masked, this is what "works")
    paper = dep.paper_attacks or [preset("pgd-20", e) for e in ctx.profile.eps]
    if dep.transfer:  # crafted on the victim to completion, as the papers did: a point frozen
        # at the first iterate that fools the victim transfers poorly (measured in a review:
        # DAE 1/255 0.47 -> 0.74, MedRDF 1/255 0.71 -> 0.92 with early stopping off)
        paper = [replace(spec, early_stop=False) for spec in paper]
    if defence.working_eps:
        paper = headline.at_budget(paper, defence.working_eps)
    gain_at: dict[float, float] = {}
    for spec in paper:
        xs, ys, ids = images(spec.eps)
        cell = attack_cell(ctx, name, dep, spec, xs, ys, ids, adaptive=False, what="paper")
        ref = reference_cell(ctx, spec, len(xs), "paper")
        non.setdefault(spec.eps, []).append(cell)
        label = spec.name + (" (crafted on the undefended victim)" if dep.transfer else "")
        gains[f"{spec.name}@{spec.eps * 255:g}"] = ref["asr"] - cell["asr"]
        gain_at[spec.eps] = max(gain_at.get(spec.eps, -1.0), ref["asr"] - cell["asr"])
        rows.append(
            make_row(
                **base,
                n=len(xs),
                attack=label,
                adaptive=False,
                eps=spec.eps,
                attack_success_rate=cell["asr"],
                spec=spec,
                asr_std=cell["asr_std"],
                repeats=dep.repeats,
                undefended_asr=ref["asr"],
                robust_accuracy=clean * (1 - cell["asr"]),
                seconds=cell["seconds"],
                grad_norm_mean=cell["grad_norm_mean"],
                zero_grad_fraction=cell["zero_grad_fraction"],
            )
        )

    dep, probed = probe_and_adapt(ctx, defence.name, dep, x, EOT_SAMPLES, REPEATS)
    grid = headline.budgets(ctx.profile.eps, defence.working_eps)
    w, why = headline.working_budget(
        defence.working_eps,
        {e: g for e, g in gain_at.items() if e in grid},
        min(grid, key=lambda e: abs(e - robust_checks.TARGET_EPS)),
    )
    curve: list[tuple[float, float]] = []
    victim_curve: list[tuple[float, float]] = []
    adaptive: dict[float, dict[str, Any]] = {}
    victim_asr: dict[float, float] = {}
    victim_clean = ctx.clean_accuracy(ctx.victim)
    worst_at: dict[float, float] = {}
    parts: dict[str, dict[str, float]] = {}
    informed = np.zeros(0, dtype=bool)  # per image: the informed attacker's success at w
    for eps in grid:
        spec = adaptive_spec(dep, eps, steps)
        xs, ys, ids = images(eps)
        cell = attack_cell(ctx, name, dep, spec, xs, ys, ids, adaptive=True, what="adaptive")
        adaptive[eps] = cell
        found = {f"PGD ({RESTARTS} step factors)": cell["success"]}
        if eps == w:  # where the verdict is judged, APGD on every image joins the attacker
            apgd = replace(spec, step_rule="apgd", restarts=1, restart_step_factors=())
            found["APGD"] = attack_cell(
                ctx, name, dep, apgd, xs, ys, ids, adaptive=True, what="adaptive-apgd"
            )["success"]
        if non.get(eps):
            found["the paper's attacks"] = np.any([c["success"] for c in non[eps]], axis=0)
        worst = np.any(list(found.values()), axis=0)
        worst_asr = worst_at[eps] = float(worst.mean())
        if eps == w:
            parts, informed = headline.parts(found), worst
        ref = reference_cell(
            ctx,
            AttackSpec(
                "adaptive-margin",
                eps,
                steps=steps,
                restarts=RESTARTS,
                restart_step_factors=STEP_FACTORS,
                loss="margin",
            ),
            len(xs),
            "adaptive",
        )
        curve.append((eps * 255, clean * (1 - worst_asr)))
        victim_curve.append((eps * 255, victim_clean * (1 - ref["asr"])))
        victim_asr[eps] = ref["asr"]
        extra = {}
        if "saturation_clean" in cell:
            extra["kernel_saturation"] = {
                "clean": cell["saturation_clean"],
                "adversarial": cell["saturation_adversarial"],
            }
        rows.append(
            make_row(
                **base,
                n=len(xs),
                attack=spec.name,
                adaptive=True,
                eps=eps,
                attack_success_rate=cell["asr"],
                spec=spec,
                asr_std=cell["asr_std"],
                asr_runs=cell["asr_runs"],
                repeats=dep.repeats,
                eot_samples=dep.eot,
                bpda=dep.bpda,
                worst_case_asr=worst_asr,
                robust_accuracy=clean * (1 - worst_asr),
                undefended_asr=ref["asr"],
                seconds=cell["seconds"],
                grad_norm_mean=cell["grad_norm_mean"],
                zero_grad_fraction=cell["zero_grad_fraction"],
                nonfinite_grad_fraction=cell["nonfinite_grad_fraction"],
                working_eps=defence.working_eps,
                informed_parts=parts if eps == w else None,
                **probed,
                **extra,
            )
        )

    result = robust_checks.Found(defence, dep, clean, non, adaptive, gains, curve, victim_asr)
    robust_checks.checks_and_notes(ctx, result)
    robust_checks.diagnostics(
        ctx,
        result,
        (x, y, idx),
        lambda spec, xs, ys, ids, what, dep=dep: attack_cell(
            ctx, name, dep, spec, xs, ys, ids, adaptive=True, what=what
        ),
        lambda d, e, **over: adaptive_spec(d, e, **({"steps": steps} | over)),
        w,
        informed,
    )  # fmt: skip
    spec_w = adaptive_spec(dep, w, steps)

    def attack(xs: Tensor, ys: Tensor) -> Tensor:
        return adaptive_attack(ctx, dep, spec_w, xs, ys).x_adv

    key = {"train": train_id(dep), "eot": dep.eot, "repeats": dep.repeats, "bpda": dep.bpda}
    square = attack_tests.evidence(
        ctx, name, dep, (x, y), informed.tolist(), w, attack, key | spec_key(spec_w)
    )
    plain = headline.whitebox_spec(w)
    xw, yw, idw = images(w)
    n = len(xw)
    wb = attack_cell(ctx, name, replace(dep, transfer=False), plain, xw, yw, idw, adaptive=False,
                     what="whitebox")  # fmt: skip
    at_w = list(zip(non.get(w, []), [p for p in paper if p.eps == w], strict=True))
    best, best_spec = max(at_w, key=lambda cs: cs[0]["asr"]) if at_w else ({"asr": None}, None)
    ctx.add_headline(
        headline.record(
            name,
            FAMILY,
            w,
            why,
            {
                "undefended": (victim_asr[w], n),
                "paper_attack": (best["asr"], n),
                "whitebox": (wb["asr"], n),
                "adaptive": (worst_at[w], n),
                "square": (square["asr"], len(square["success"])),
            },
            "-" if best_spec is None else best_spec.name + (" (transfer)" if dep.transfer else ""),
            [f"informed attacker = per image the best of {headline.parts_text(parts)}; "
             f"white-box = plain PGD-{plain.steps} (CE) through the deployed pipeline, no EOT "
             "or BPDA; two classes: a targeted attack is the untargeted one"],
        )
    )  # fmt: skip
    for r in rows:
        r["headline_eps"] = w
    robust_checks.fixtures(ctx)
    robust_checks.update_curves_figure(ctx, name, curve, victim_curve, w)
    return rows

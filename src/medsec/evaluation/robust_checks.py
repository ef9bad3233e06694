"""Checks, diagnostics and notes of the robustification evaluator, for any Defence.

Validity checks (can this evaluation be trusted?): a working classifier, ASR non-decreasing
in eps, adaptive >= non-adaptive, the indicators of attack failure (Pintor et al. 2022),
convergence (stronger variants of the attack add nothing) and a step-size sweep at the
working budget, and the item-8 fixtures. Outcome checks: what the study found. Plus the
notes that carry the defence's paper, assumptions and training record into the report.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from torch import Tensor

from medsec.attacks import AttackSpec
from medsec.defences.base import Defence, Deployed
from medsec.evaluation import diagnostics as diag
from medsec.evaluation import indicators
from medsec.evaluation.context import StudyContext

FAMILY = "robustification"
TARGET_EPS = 4 / 255
TARGET_ASR = 0.90
GAIN_MIN = 0.05  # a non-adaptive ASR drop below this is "no gain"
TOLERANCE = 0.05  # convergence / step-size tolerance (absolute ASR)
N_DIAG = 48  # images for the step-size sweep, the long run and the fixtures
SWEEP = (0.5, 1.0, 2.5, 10.0, 50.0)

# (spec, x, y, idx, what, dep=None) -> the attack cell of the defence under evaluation
# (dep: a variant of the deployed defence, e.g. with more EOT samples)
AttackRun = Callable[..., dict[str, Any]]


@dataclass
class Found:
    """What the evaluator measured for one defence (input to checks and notes)."""

    defence: Defence
    dep: Deployed
    clean: float
    non: dict[float, list[dict[str, Any]]]  # eps -> paper-attack cells
    adaptive: dict[float, dict[str, Any]]  # eps -> adaptive cell
    gains: dict[str, float]  # "attack@eps" -> undefended ASR - defended ASR
    curve: list[tuple[float, float]]  # (eps/255, robust accuracy)
    victim_asr: dict[float, float]  # eps -> the same adaptive attack on the victim

    @property
    def name(self) -> str:
        return self.defence.name

    @property
    def eps4(self) -> float:
        return min(self.adaptive, key=lambda e: abs(e - TARGET_EPS))


def _check(
    ctx: StudyContext,
    f: Found,
    check: str,
    passed: bool,
    detail: str,
    *,
    kind: str = "validity",
    measured: Any = None,
    expected: str | None = None,
) -> None:
    ctx.add_check(
        f"{f.name}: {check}",
        passed,
        detail,
        kind=kind,
        defence=f.name,
        measured=measured,
        expected=expected,
    )


def _note(ctx: StudyContext, f: Found, text: str) -> None:
    ctx.add_note(f"{f.name}: {text}", family=FAMILY, defence=f.name)


def checks_and_notes(ctx: StudyContext, f: Found) -> None:
    """The defence's paper, assumptions and record; outcome and validity checks."""
    d, dep = f.defence, f.dep
    best_gain = max(f.gains.values()) if f.gains else 0.0
    best_at = max(f.gains, key=f.gains.get) if f.gains else "-"
    gained = best_gain >= GAIN_MIN
    rec = json.dumps({k: v for k, v in dep.record.items() if k != "config"}, default=str)
    _note(
        ctx,
        f,
        f"{d.paper or d.summary}. "
        + (
            f"Built with {json.dumps(dep.record['config'])} -> {rec}. "
            if "config" in dep.record
            else f"Built: {rec}. "
            if dep.record
            else ""
        )
        + f"Clean test accuracy {f.clean:.3f}. "
        + (f"Working budget claimed: {d.working_eps * 255:g}/255. " if d.working_eps else "")
        + " ".join(dep.notes)
        + (" Assumed: " + "; ".join(d.assumptions) + "." if d.assumptions else ""),
    )
    _note(
        ctx,
        f,
        "non-adaptive evaluation "
        + (
            "(attacks crafted on the undefended victim, the defence-unaware attacker of the paper) "
            if dep.transfer
            else "(white-box on the defended model with CE, as in the paper) "
        )
        + (
            f"showed the claimed gain: ASR down by {best_gain:.3f} vs the undefended victim "
            f"at {best_at}/255."
            if gained
            else f"did NOT show the claimed gain (largest ASR drop vs the undefended victim "
            f"{best_gain:.3f} at {best_at}/255, below {GAIN_MIN})."
        ),
    )
    labels = np.asarray(ctx.data.test.labels)
    majority = float(np.bincount(labels).max() / len(labels))
    _check(
        ctx,
        f,
        "a working classifier (clean accuracy >= majority-class rate + 0.1)",
        f.clean >= majority + 0.1,
        f"clean accuracy {f.clean:.3f}, majority-class rate {majority:.3f}; below it the "
        "pipeline is (near) constant and a low ASR says nothing about robustness",
        measured=f.clean,
        expected=f">= {majority + 0.1:.3f}",
    )
    a4 = f.adaptive[f.eps4]
    if d.reference:
        _note(
            ctx,
            f,
            f"(honest baseline): adaptive ASR at 4/255 {a4['asr']:.3f}, robust accuracy "
            f"{f.clean * (1 - a4['asr']):.3f}.",
        )
    else:
        _check(
            ctx,
            f,
            f"adaptive ASR at 4/255 >= {TARGET_ASR:.0%} where a non-adaptive gain showed",
            (not gained) or a4["asr"] >= TARGET_ASR,
            f"non-adaptive gain {best_gain:.3f} ({'shown' if gained else 'not shown'}); "
            f"adaptive ASR {a4['asr']:.3f} +- {a4['asr_std']:.3f} over {dep.repeats} "
            f"evaluation(s); the same attack on the undefended victim: "
            f"{f.victim_asr[f.eps4]:.3f}",
            kind="outcome",
            measured=a4["asr"],
            expected=f">= {TARGET_ASR}",
        )
    e10 = next((e for e, acc in sorted(f.curve) if acc <= 0.10), None)
    _note(
        ctx,
        f,
        "smallest eps at which robust accuracy falls to 10%: "
        + (
            f"{e10:g}/255."
            if e10 is not None
            else f"not reached up to {max(e for e, _ in f.curve):g}/255 "
            f"(robust accuracy {min(a for _, a in f.curve):.3f} there)."
        ),
    )
    eps_sorted = sorted(f.adaptive)
    asrs = [f.adaptive[e]["asr"] for e in eps_sorted]
    tol = 2 * max(f.adaptive[e]["asr_std"] for e in eps_sorted) + 0.02
    _check(
        ctx,
        f,
        "adaptive ASR non-decreasing in eps",
        all(b >= a - tol for a, b in itertools.pairwise(asrs)),
        "ASR "
        + ", ".join(f"{e * 255:g}/255: {a:.3f}" for e, a in zip(eps_sorted, asrs, strict=True)),
        measured=asrs,
        expected=f"non-decreasing (tolerance {tol:.3f})",
    )
    worse = [
        (e, max(c["asr"] for c in f.non[e]), f.adaptive[e]["asr"]) for e in eps_sorted if e in f.non
    ]
    _check(
        ctx,
        f,
        "adaptive >= non-adaptive at every eps",
        all(a >= m - tol for _, m, a in worse),
        "; ".join(f"{e * 255:g}/255: non-adaptive {m:.3f}, adaptive {a:.3f}" for e, m, a in worse),
        measured=max((m - a for _, m, a in worse), default=0.0),
        expected=f"non-adaptive - adaptive <= {tol:.3f}",
    )
    if "saturation_clean" in a4:
        _note(
            ctx,
            f,
            f"kernel saturation at 4/255: clean {a4['saturation_clean']}, adversarial "
            f"{a4['saturation_adversarial']}.",
        )
    by_eps = {e: c.get("indicators", []) for e, c in f.adaptive.items()}
    indicators.add_checks(ctx, f.name, by_eps, prefix=f"{f.name}: ")


def diagnostics(
    ctx: StudyContext,
    f: Found,
    attacked: tuple[Tensor, Tensor, Tensor],
    run: AttackRun,
    spec_for: Callable[..., AttackSpec],
    eps: float,
    informed: np.ndarray,
) -> None:
    """At the working budget ``eps``, where the verdict is judged (at 4/255 every attack
    saturates and these checks could not fail): stronger variants of the attack (2x steps
    and restarts, 2x EOT for a randomised pipeline) and the images each fools that the
    informed attacker (``informed``: its per-image success there, APGD included) did not,
    the step-size sweep and the loss curve; the unconstrained attack (steps of the 4/255
    attack); on the first images of the ``attacked`` set (x, y, test indices)."""
    dep = f.dep
    n_diag = N_DIAG if dep.eot == 1 else N_DIAG // 2  # EOT multiplies the cost
    x, y, idx = (t[:n_diag] for t in attacked)
    base = spec_for(dep, eps)
    variants = {
        f"{2 * base.steps} steps x {2 * base.restarts} restarts": run(
            spec_for(dep, eps, steps=2 * base.steps, restarts=2 * base.restarts),
            x, y, idx, "diag-long",
        ),
    }  # fmt: skip
    if dep.eot > 1:
        more = replace(dep, eot=2 * dep.eot)
        variants[f"{more.eot} EOT samples"] = run(
            spec_for(more, eps), x, y, idx, "diag-eot2x", dep=more
        )
    curve = run(spec_for(dep, eps, restarts=1, early_stop=False), x, y, idx, "diag-curve")
    sweep = {
        f"{s:g}": run(
            spec_for(dep, eps, restarts=1, restart_step_factors=(s,)),
            x,
            y,
            idx,
            f"diag-sweep-{s:g}",
        )["asr"]
        for s in SWEEP
    }
    unbounded = run(spec_for(dep, TARGET_EPS).unconstrained(), x, y, idx, "diag-unbounded")
    pgd_sub = float(np.mean(f.adaptive[eps]["success"][: len(x)]))
    hit = np.asarray(informed[: len(x)], dtype=bool)
    main_sub = float(hit.mean())
    at = f"{eps * 255:g}/255"
    path = ctx.figure_path(f"robust-{f.name}-loss-sweep.png")
    diag.plot_loss_and_sweep(
        path,
        curve["loss_curve"],
        sweep,
        f"{f.name}: adaptive attack at {at} ({len(x)} images, {dep.eot} EOT)",
    )
    ctx.add_figure(
        path,
        f"{f.name}: margin objective vs iteration (no early stop) and ASR vs step size, "
        f"adaptive attack at its working budget {at}.",
        family=FAMILY,
        defence=f.name,
    )
    added = {
        k: float((np.asarray(v["success"], dtype=bool) & ~hit).mean()) for k, v in variants.items()
    }
    _check(
        ctx,
        f,
        f"convergence (no stronger variant of the attack fools more than {TOLERANCE} of the "
        "images the informed attacker missed)",
        max(added.values()) <= TOLERANCE,
        f"at {at} on {len(x)} images: the informed attacker {main_sub:.3f} (its PGD, "
        f"{base.steps} steps x {base.restarts} restarts, {pgd_sub:.3f}); "
        + "; ".join(
            f"{k}: {v['asr']:.3f} ({added[k]:.3f} of the images only by it)"
            for k, v in variants.items()
        ),
        measured=added,
        expected=f"each <= {TOLERANCE}",
    )
    best = max(sweep.values())
    _check(
        ctx,
        f,
        f"step-size sweep (the attack within {TOLERANCE} of its best single step factor, "
        "one restart each)",
        pgd_sub >= best - TOLERANCE,
        f"at {at}: the PGD attack {pgd_sub:.3f}; one restart at step factor "
        + ", ".join(f"{k}: {v:.3f}" for k, v in sweep.items()),
        measured=best - pgd_sub,
        expected=f"<= {TOLERANCE}",
    )
    # an image counts where it fools the majority of evaluations, as in every headline rate
    ind = indicators.unconstrained(float(np.mean(unbounded["success"])), len(x))
    _check(
        ctx,
        f,
        f"indicator: {ind.name}",
        bool(ind.passed),
        ind.detail,
        measured=ind.measured,
        expected=ind.expected,
    )


def fixtures(ctx: StudyContext) -> None:
    """evaluation.md item 8, once per study run (cached across runs)."""
    if any(c.name.startswith("fixture:") for c in ctx.checks):
        return
    x, y, _ = ctx.attack_set(ctx.victim, N_DIAG)
    eps, steps = 8 / 255, ctx.profile.adaptive_steps
    res = ctx.cell(
        {"defence": "none", "what": "robust-fixtures", "eps_255": 8, "n": len(x), "steps": steps},
        lambda: diag.run_fixtures(ctx.victim, x, y, eps, steps, seed=ctx.seed),
    )
    u, i, k, kb = res["undefended"], res["identity"], res["killer"], res["killer_bpda"]
    ctx.add_check(
        "fixture: undefended victim falls to ~0% robust accuracy",
        u["asr"] >= 0.98,
        f"adaptive margin PGD at 8/255 on {len(x)} images: ASR {u['asr']:.3f}",
        kind="validity",
        measured=u["asr"],
        expected=">= 0.98",
    )
    ctx.add_check(
        "fixture: identity defence beaten by the adaptive attack",
        i["asr"] >= 0.98 and abs(i["asr"] - u["asr"]) <= 0.02,
        f"ASR {i['asr']:.3f} (victim {u['asr']:.3f})",
        kind="validity",
        measured=i["asr"],
        expected=">= 0.98 and within 0.02 of the victim",
    )
    ctx.add_check(
        "fixture: gradient-killing layer masks plain PGD and is beaten with BPDA",
        k["zero_grad_fraction"] == 1.0 and kb["asr"] >= 0.98,
        f"plain PGD-20: zero-gradient fraction {k['zero_grad_fraction']:.2f}, ASR "
        f"{k['asr']:.3f}; adaptive + BPDA(identity backward): ASR {kb['asr']:.3f}",
        kind="validity",
        measured=kb["asr"],
        expected="zero-gradient fraction 1.0 without BPDA, ASR >= 0.98 with it",
    )


def update_curves_figure(
    ctx: StudyContext,
    name: str,
    curve: list[tuple[float, float]],
    victim_curve: list[tuple[float, float]],
    working: float,
) -> None:
    """Store this defence's curve and working budget (eps), and redraw the one figure with
    every curve so far."""
    from medsec.utils import atomic_write_json

    store = ctx.artifact("robust/curves")
    store.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        store / f"{name}.json", {"points": [list(p) for p in curve], "working": working * 255}
    )
    atomic_write_json(store / "none (undefended).json", {"points": [list(p) for p in victim_curve]})
    stored = {p.stem: json.loads(p.read_text()) for p in sorted(store.glob("*.json"))}
    stored = {k: v if isinstance(v, dict) else {"points": v} for k, v in stored.items()}
    path = ctx.figure_path("robust-accuracy-vs-eps.png")
    diag.plot_robust_accuracy(
        path,
        {k: v["points"] for k, v in stored.items()},
        "adaptive attack: robust accuracy vs eps",
        {k: v["working"] for k, v in stored.items() if v.get("working") is not None},
    )
    ctx.add_figure(
        path,
        "Robust accuracy (clean accuracy x (1 - per-example worst-case ASR)) under the "
        "adaptive attack vs eps, every robustification defence and the undefended victim; "
        "star: the defence's working budget, where its headline verdict is judged; dotted "
        "line: 10%.",
        family=FAMILY,
    )

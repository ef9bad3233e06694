"""The cached attack cells of the robustification family: one attack on a deployed defence,
the same attack on the undefended victim, and the adaptive attack's settings (PGD with a
step factor per restart, the margin loss on the attacker's view, EOT where randomised)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from medsec.attacks import (
    EOT,
    AttackResult,
    AttackSpec,
    Objective,
    logits_forward,
    margin,
    run_attack,
)
from medsec.attacks.criteria import majority, success_runs
from medsec.defences.base import Deployed
from medsec.evaluation import indicators as ind
from medsec.evaluation.context import StudyContext
from medsec.evaluation.diagnostics import gradient_stats, margin_objective_factory

# PGD with a different step factor per restart (alpha = f x eps / steps), not APGD: on the
# full profile APGD reached ASR 0.56 on PGD-AT at 4/255 where these factors reach 0.92
# (APGD halves its step where a rugged loss stalls; factor 50 hops across). Elsewhere they
# tie (benchmarks/apgd_vs_pgd.py: victim, KMM, SSAT at 0.25-2/255, within 1 image of 200).
STEP_FACTORS = (2.5, 10.0, 50.0)
RESTARTS = len(STEP_FACTORS)


def train_id(dep: Deployed) -> Any:
    """What identifies the trained defence in cell keys (never volatile fields like time)."""
    return dep.record.get("artifact") or {
        k: v for k, v in dep.record.items() if k not in ("cached", "train_seconds")
    }


def rejected(ctx: StudyContext, dep: Deployed) -> float | None:
    """Share of clean test images the deployed reject option refuses (None: it has none)."""
    if dep.detector is None:
        return None
    x = torch.from_numpy(ctx.data.test.images)
    bs = ctx.profile.batch_size
    with torch.no_grad():
        flags = [
            dep.detector.flags(x[s : s + bs].to(ctx.device)).cpu() for s in range(0, len(x), bs)
        ]
    return float(torch.cat(flags).float().mean())


def summary(succ: Tensor) -> dict[str, Any]:
    """Rates of (repeats, N) success runs and the per-example majority decision."""
    rates = succ.float().mean(1)
    return {
        "asr": float(rates.mean()),
        "asr_std": float(rates.std()) if len(rates) > 1 else 0.0,
        "asr_runs": rates.tolist(),
        "success": majority(succ).tolist(),
    }


def spec_key(spec: AttackSpec) -> dict[str, Any]:
    return {"attack": spec.name, "eps_255": round(spec.eps * 255, 4), "spec": spec.record()}


def adaptive_spec(dep: Deployed, eps: float, steps: int, **over: Any) -> AttackSpec:
    name = (
        "adaptive-margin"
        + ("-eot" if dep.eot > 1 else "")
        + ("-bpda" if dep.bpda != "none" else "")
    )
    kw: dict[str, Any] = {
        "steps": steps,
        "restarts": RESTARTS,
        "restart_step_factors": STEP_FACTORS,
        "loss": "margin",
        "eot_samples": dep.eot,
    }
    kw.update(over)
    return AttackSpec(name, eps, **kw)


def _objective_factory(dep: Deployed) -> Callable[[Tensor, Tensor], Any]:
    view = dep.attack_view if dep.attack_view is not None else dep.pipeline

    def make(labels: Tensor, idx: Tensor) -> Any:
        obj = Objective(logits_forward(view), [(1.0, margin())], labels)
        return EOT(obj, dep.eot, batched=True) if dep.eot > 1 else obj

    return make


def adaptive_attack(
    ctx: StudyContext, dep: Deployed, spec: AttackSpec, x: Tensor, y: Tensor
) -> AttackResult:
    """The informed attack on the deployed defence: the margin on the attacker's view (EOT
    where randomised), success by the deployed pipeline and its reject option, if any."""
    return run_attack(
        dep.pipeline,
        x,
        y,
        spec,
        detector=dep.detector,
        objective_factory=_objective_factory(dep),
        batch_size=ctx.profile.batch_size,
        seed=ctx.seed,
        repeats=dep.repeats,
    )


def attack_cell(
    ctx: StudyContext,
    name: str,
    dep: Deployed,
    spec: AttackSpec,
    x: Tensor,
    y: Tensor,
    idx: Tensor,
    *,
    adaptive: bool,
    what: str,
) -> dict[str, Any]:
    """One attack on the defence (cached); success re-predicted through the deployed pipeline."""

    def compute() -> dict[str, Any]:
        if dep.reseed is not None:
            dep.reseed(ctx.seed)
        if adaptive:
            res = adaptive_attack(ctx, dep, spec, x, y)
        else:
            source = ctx.victim if dep.transfer else dep.pipeline
            res = run_attack(source, x, y, spec, batch_size=ctx.profile.batch_size, seed=ctx.seed)
        succ = success_runs(
            dep.pipeline,
            res.x_adv,
            y,
            detector=dep.detector,
            repeats=dep.repeats,
            reseed=dep.reseed,
            seed=ctx.seed,
            batch_size=ctx.profile.batch_size,
        )
        out = summary(succ)
        ctx.save_adversarial(
            f"{name}-{what}-{spec.name}-{spec.eps * 255:g}",
            res.x_adv,
            idx,
            torch.tensor(out["success"]),
            defence=name,
            attack=spec.name,
            eps=spec.eps,
            adaptive=adaptive,
        )
        if adaptive:
            out["indicators"] = ind.of_run(ctx, dep, x, y, res, succ)
        if dep.diagnostics is not None:
            out["saturation_clean"] = dep.diagnostics(x.to(ctx.device))
            out["saturation_adversarial"] = dep.diagnostics(res.x_adv.to(ctx.device))
        return {
            **out,
            "seconds": res.seconds,
            "loss_curve": res.loss_curve[:400],
            **gradient_stats(res),
            "max_linf": float((res.x_adv - x).abs().max()) if len(x) else 0.0,
        }

    key = {"defence": name, "what": what, "n": len(x), **spec_key(spec)}
    key.update(train=train_id(dep), eot=dep.eot, repeats=dep.repeats, bpda=dep.bpda)
    if adaptive:
        key["indicators"] = ind.SETTINGS
    return ctx.cell(key, compute)


def reference_cell(ctx: StudyContext, spec: AttackSpec, n: int, what: str) -> dict[str, Any]:
    """The same attack on the undefended victim (its own correctly classified images)."""
    x, y, idx = ctx.attack_set(ctx.victim, n)

    def compute() -> dict[str, Any]:
        obj = margin_objective_factory(ctx.victim) if spec.loss == "margin" else None
        res = run_attack(
            ctx.victim,
            x,
            y,
            spec,
            objective_factory=obj,
            batch_size=ctx.profile.batch_size,
            seed=ctx.seed,
        )
        ctx.save_adversarial(
            f"none-robust-{what}-{spec.name}-{spec.eps * 255:g}",
            res.x_adv,
            idx,
            res.success,
            defence="none",
            attack=spec.name,
            eps=spec.eps,
            adaptive=what == "adaptive",
        )
        return {"asr": float(res.success.float().mean()), "seconds": res.seconds}

    key = {"defence": "none", "what": f"robust-reference-{what}", "n": len(x), **spec_key(spec)}
    return ctx.cell(key, compute)

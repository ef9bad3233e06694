"""Probe a deployed defence before attacking it, and adapt the attack to what is found.

A plug-in may say nothing about how to attack it. Two measurements decide (Athalye et al.
2018; Tramer et al. 2020): (a) are input gradients through the pipeline (and through its
declared ``preprocess``) zero, missing or non-finite - then the preprocess gets BPDA with the
identity on the backward pass; (b) do two identical calls give different outputs - then the
attack averages over the randomness (EOT) and success is re-evaluated several times.
Adaptations apply only where the defence declared none (its own attack view, EOT).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from medsec.attacks import BPDA, eval_mode
from medsec.defences.base import Deployed, Pipeline
from medsec.evaluation.context import StudyContext

N_PROBE = 16


@dataclass(frozen=True)
class Probe:
    """What the probe measured (fractions over the probed images)."""

    n: int
    zero_grad_fraction: float  # pipeline input gradient all zero (or absent)
    nonfinite_grad_fraction: float
    preprocess_zero_grad_fraction: float | None  # None: no preprocess declared
    randomised: bool  # two identical calls gave different logits
    max_logit_change: float

    def record(self) -> dict[str, float | int | bool | None]:
        return asdict(self)


def _input_grad(module: nn.Module, x: Tensor, reduce: bool) -> Tensor:
    """d sum(module(x) * r) / dx for a fixed random r (zeros where the graph is cut)."""
    x = x.clone().requires_grad_(True)
    out = module(x)
    if not out.requires_grad:
        return torch.zeros_like(x)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out)
    value = (out * r).sum() if reduce else out.sum()
    (grad,) = torch.autograd.grad(value, x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def _fractions(grad: Tensor) -> tuple[float, float]:
    flat = grad.flatten(1)
    finite = torch.isfinite(flat).all(1)
    zero = finite & (flat.abs().amax(1) == 0)
    return float(zero.float().mean()), float((~finite).float().mean())


def probe(dep: Deployed, x: Tensor) -> Probe:
    """Measure gradients and randomness of ``dep`` on (up to ``N_PROBE``) images ``x``."""
    x = x[:N_PROBE]
    with eval_mode(dep.pipeline):
        zero, nonfinite = _fractions(_input_grad(dep.pipeline, x, reduce=True))
        pre = None
        if dep.preprocess is not None:
            pre = _fractions(_input_grad(dep.preprocess, x, reduce=True))[0]
        with torch.no_grad():
            a, b = dep.pipeline(x), dep.pipeline(x)
    change = float((a - b).abs().max()) if a.numel() else 0.0
    return Probe(len(x), zero, nonfinite, pre, change > 0, change)


def adapt(dep: Deployed, found: Probe, eot: int, repeats: int) -> tuple[Deployed, list[str]]:
    """The deployed defence with the adaptations the probe calls for, and what was done."""
    done: list[str] = []
    if dep.attack_view is None and (found.preprocess_zero_grad_fraction or 0) > 0:
        view = Pipeline(dep.classifier, BPDA(dep.preprocess)).train(dep.classifier.training)
        dep = replace(
            dep,
            attack_view=view,
            bpda="preprocess: exact forward, identity backward (BPDA; the probe found zero "
            f"input gradients through it on {found.preprocess_zero_grad_fraction:.0%} of images)",
        )
        done.append("BPDA (identity backward) around the preprocess")
    if found.randomised and dep.eot == 1:
        dep = replace(dep, eot=eot, repeats=max(dep.repeats, repeats))
        done.append(
            f"EOT over {eot} draws per step and success re-evaluated {repeats} times "
            f"(two identical calls differed by up to {found.max_logit_change:.3g} in the logits)"
        )
    masked = found.zero_grad_fraction > 0 or found.nonfinite_grad_fraction > 0
    if masked and dep.attack_view is None:
        done.append(
            "none possible: gradients through the pipeline are zero or non-finite on "
            f"{found.zero_grad_fraction + found.nonfinite_grad_fraction:.0%} of images and no "
            "preprocess or attack view is declared, so a gradient attack cannot be trusted"
        )
    return dep, done


def probe_and_adapt(
    ctx: StudyContext, name: str, dep: Deployed, x: Tensor, eot: int, repeats: int
) -> tuple[Deployed, dict[str, Any]]:
    """Probe the pipeline, adapt the attack where the defence declared nothing (``eot``
    samples, ``repeats`` evaluations), note it in the robustification section.

    The probe draws from a randomised pipeline's noise: it starts from the study seed (the
    pipeline reseeded, the global stream forked), so what it measures does not depend on
    what ran before it (e.g. whether earlier cells were computed or read from the cache)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        if dep.reseed is not None:
            dep.reseed(ctx.seed)
        found = probe(dep, x.to(ctx.device))
    declared = (
        f" The defence declares its own attack view ({dep.bpda}; EOT {dep.eot})."
        if dep.attack_view is not None
        else ""
    )
    dep, done = adapt(dep, found, eot, repeats)
    ctx.add_note(
        f"{name}: probe on {found.n} images - input-gradient zero fraction "
        f"{found.zero_grad_fraction:.2f}, non-finite {found.nonfinite_grad_fraction:.2f}"
        + (
            ""
            if found.preprocess_zero_grad_fraction is None
            else f", through the preprocess zero {found.preprocess_zero_grad_fraction:.2f}"
        )
        + f"; randomised: {'yes' if found.randomised else 'no'}. Adaptations applied: "
        + ("; ".join(done) if done else "none needed")
        + "."
        + declared,
        family="robustification",
        defence=name,
    )
    return dep, {"probe": found.record(), "adaptations": done}

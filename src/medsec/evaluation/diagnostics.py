"""Gradient-masking diagnostics for the robustification defences (evaluation.md items 3-8).

- gradient statistics of an attack (mean input-gradient norm, zero and non-finite fractions);
- saturation of the kernel mapping layers (``KMMNet.saturation``);
- loss-vs-iteration curves and a step-size sweep (one figure per defence);
- the item-8 fixtures: the undefended victim, an identity "defence" and a gradient-killing
  layer (8-bit quantisation, whose gradient is zero everywhere), each attacked with and
  without the adaptive machinery (BPDA with the identity on the backward pass).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor, nn

from medsec.attacks import (
    BPDA,
    AttackResult,
    AttackSpec,
    Objective,
    logits_forward,
    margin,
    run_attack,
)
from medsec.evaluation.figures import save as save_figure


class GradientKiller(nn.Module):
    """8-bit quantisation round(255 x) / 255: leaves images as they are, kills every gradient."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.round(x * 255) / 255


def identity_defence(victim: nn.Module) -> nn.Module:
    """A "defence" that does nothing: the adaptive machinery must beat it like the victim.

    Wrappers take the victim's train/eval mode: the attack restores the wrapper's mode
    afterwards, which must not leave the shared victim in training mode."""
    return nn.Sequential(nn.Identity(), victim).train(victim.training)


def gradient_killed(victim: nn.Module) -> nn.Module:
    """The victim behind a gradient-killing layer (what a gradient-based attack sees: 0)."""
    return nn.Sequential(GradientKiller(), victim).train(victim.training)


def bpda_view(victim: nn.Module) -> nn.Module:
    """The same pipeline with the killer under BPDA (identity backward): the adaptive view."""
    return nn.Sequential(BPDA(GradientKiller()), victim).train(victim.training)


def margin_objective_factory(view: nn.Module) -> Any:
    """Objective factory for ``run_attack``: margin loss on the logits of ``view``."""
    return lambda labels, idx: Objective(logits_forward(view), [(1.0, margin())], labels)


def gradient_stats(result: AttackResult) -> dict[str, float | str]:
    """Input-gradient statistics at the first step of an attack (masking shows here), and
    the precision the gradients were computed in."""
    return {
        "gradient_precision": result.precision,
        "grad_norm_mean": result.grad_norm_mean,
        "zero_grad_fraction": result.zero_grad_fraction,
        "nonfinite_grad_fraction": result.nonfinite_grad_fraction,
    }


def run_fixtures(
    victim: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Attack success and gradient stats of the item-8 fixtures at ``eps``.

    ``undefended`` and ``identity``: adaptive margin PGD. ``killer``: plain CE PGD-20 through
    the gradient-killing layer (non-adaptive: must stall, zero gradients). ``killer_bpda``:
    the adaptive attack with BPDA around the killer (must succeed like on the victim).
    """
    adaptive = AttackSpec("adaptive-margin", eps, steps=steps, loss="margin", restarts=2)
    plain = AttackSpec("pgd-20", eps, steps=20)
    killed = gradient_killed(victim)
    runs = {
        "undefended": run_attack(victim, x, y, adaptive, seed=seed),
        "identity": run_attack(identity_defence(victim), x, y, adaptive, seed=seed),
        "killer": run_attack(killed, x, y, plain, seed=seed),
        "killer_bpda": run_attack(
            killed,
            x,
            y,
            adaptive,
            objective_factory=margin_objective_factory(bpda_view(victim)),
            seed=seed,
        ),
    }
    return {
        k: {"asr": float(r.success.float().mean()), **gradient_stats(r)} for k, r in runs.items()
    }


def plot_loss_and_sweep(
    path: Path,
    curve: list[float],
    sweep: dict[str, float],
    title: str,
) -> None:
    """Left: adaptive objective vs iteration. Right: ASR vs step size (eps multiples)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    a.plot(range(1, len(curve) + 1), curve)
    a.set_xlabel("iteration")
    a.set_ylabel("mean margin objective")
    a.set_title("loss vs iteration")
    factors = sorted(sweep, key=float)
    b.plot([float(f) for f in factors], [sweep[f] for f in factors], "o-")
    b.set_xscale("log")
    b.set_xticks([float(f) for f in factors], factors)
    b.minorticks_off()
    b.set_ylim(-0.02, 1.02)
    b.set_xlabel("step factor (alpha = factor * eps / steps)")
    b.set_ylabel("attack success rate")
    b.set_title("step-size sweep")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_robust_accuracy(
    path: Path,
    curves: dict[str, list[list[float]]],
    title: str,
    working: dict[str, float] | None = None,
) -> None:
    """Robust accuracy (adaptive attack) vs eps (in /255) for every defence and the victim;
    a star marks each defence's working budget (``working``: name -> eps in /255)."""
    working = working or {}
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name in sorted(curves, key=lambda n: (n != "none (undefended)", n)):
        pts = sorted(curves[name])
        style = "k--" if name.startswith("none") else "o-"
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
        at = [p for p in pts if name in working and abs(p[0] - working[name]) < 1e-6]
        if at:
            ax.plot(at[0][0], at[0][1], "*", ms=13, color=line.get_color(), mec="k", mew=0.6)
    ax.axhline(0.1, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ticks = sorted({p[0] for pts in curves.values() for p in pts})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("eps (x / 255, L-inf)")
    ax.set_ylabel("robust accuracy (test)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)

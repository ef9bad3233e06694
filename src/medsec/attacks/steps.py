"""Step rules of the one attack loop: plain projected gradient steps (PGD) and APGD.

A rule is created per restart on the examples still running, takes one ascent step from
the current iterate given its gradient and objective value, and follows the examples as the
loop drops the finished ones (``keep``). Both project onto the eps-ball and onto [0, 1].

APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks"): step size 2 eps halved per example at checkpoints where
the objective stalled, momentum 0.75, and a restart from the best point after each halving.
Written here (not taken from torchattacks/AutoAttack) so it runs inside the loop's
per-example bookkeeping: one Criterion, early stop, best-iterate return, indicators.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

RHO = 0.75  # APGD: fraction of improving steps below which the step size halves
MOMENTUM = 0.75


class StepRule(Protocol):
    """One ascent step per call; state follows the examples the loop keeps."""

    def step(self, xa: Tensor, grad: Tensor, value: Tensor, t: int) -> Tensor: ...

    def keep(self, mask: Tensor) -> None: ...


def project(xa: Tensor, x0: Tensor, eps: float, norm: str) -> Tensor:
    """Onto the eps-ball around ``x0`` (L-inf or L2) and then onto [0, 1]."""
    if norm == "linf":
        return torch.minimum(torch.maximum(xa, x0 - eps), x0 + eps).clamp_(0, 1)
    delta = xa - x0
    shape = (-1, *[1] * (delta.ndim - 1))
    dnorm = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
    return (x0 + delta * (eps / dnorm).clamp(max=1.0)).clamp_(0, 1)


def direction(grad: Tensor, norm: str) -> Tensor:
    """Steepest-ascent direction of unit norm: sign (L-inf) or grad / ||grad|| (L2)."""
    if norm == "linf":
        return grad.sign()
    shape = (-1, *[1] * (grad.ndim - 1))
    return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)


class PGDStep:
    """Fixed step ``alpha`` along the steepest-ascent direction, then projection.

    L-inf uses a precomputed box ``[x0 - eps, x0 + eps] ∩ [0, 1]``: one clamp per step."""

    def __init__(self, x0: Tensor, eps: float, norm: str, alpha: float) -> None:
        self.x0, self.eps, self.norm, self.alpha = x0, eps, norm, alpha
        self.box = ((x0 - eps).clamp_(min=0), (x0 + eps).clamp_(max=1)) if norm == "linf" else None

    def step(self, xa: Tensor, grad: Tensor, value: Tensor, t: int) -> Tensor:
        if self.box is not None:
            return torch.add(xa, grad.sign(), alpha=self.alpha).clamp_(*self.box)
        return project(xa + self.alpha * direction(grad, self.norm), self.x0, self.eps, self.norm)

    def keep(self, mask: Tensor) -> None:
        self.x0 = self.x0[mask]
        if self.box is not None:
            self.box = (self.box[0][mask], self.box[1][mask])


def checkpoints(steps: int) -> set[int]:
    """APGD's checkpoints w_j = ceil(p_j N): p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    marks = (math.ceil(round(q, 6) * steps) for q in p[1:])  # round: 0.41 * 100 is 41.000..1
    return {w for w in marks if w < steps}


class APGDStep:
    """APGD's step rule on the examples of one restart (per-example step size)."""

    def __init__(self, x0: Tensor, eps: float, norm: str, steps: int) -> None:
        self.x0, self.eps, self.norm = x0, eps, norm
        n, shape = len(x0), (-1, *[1] * (x0.ndim - 1))
        self.shape = shape
        self.eta = torch.full((n,), 2.0 * eps, device=x0.device)
        self.prev: Tensor | None = None  # x^(k-1)
        self.last_value = torch.full((n,), -math.inf, device=x0.device)
        self.best_value = torch.full((n,), -math.inf, device=x0.device)
        self.best_x = x0.clone()
        self.improved = torch.zeros(n, device=x0.device)  # steps with f(x^(k+1)) > f(x^(k))
        self.ckpt_eta = self.eta.clone()
        self.ckpt_best = self.best_value.clone()
        self.ckpts = sorted(checkpoints(steps))
        self.last_ckpt = 0

    def step(self, xa: Tensor, grad: Tensor, value: Tensor, t: int) -> Tensor:
        value = value.detach().to(self.best_value.dtype)
        self.improved += (value > self.last_value).float() * (t > 0)
        self.last_value = value
        better = value > self.best_value
        self.best_value = torch.where(better, value, self.best_value)
        self.best_x[better] = xa[better]
        stalled = None
        if self.ckpts and t == self.ckpts[0]:
            self.ckpts.pop(0)
            span = t - self.last_ckpt
            stalled = (self.improved < RHO * span) | (
                (self.ckpt_eta == self.eta) & (self.ckpt_best == self.best_value)
            )
            self.ckpt_eta, self.ckpt_best = self.eta.clone(), self.best_value.clone()
            self.eta = torch.where(stalled, self.eta / 2, self.eta)
            self.improved.zero_()
            self.last_ckpt = t
        eta = self.eta.view(self.shape)
        z = project(xa + eta * direction(grad, self.norm), self.x0, self.eps, self.norm)
        if self.prev is None:
            nxt = z
        else:
            nxt = xa + MOMENTUM * (z - xa) + (1 - MOMENTUM) * (xa - self.prev)
        nxt = project(nxt, self.x0, self.eps, self.norm)
        self.prev = xa
        if stalled is not None:  # halved: go on from the best point, momentum reset
            back = stalled.view(self.shape)
            nxt = torch.where(back, self.best_x, nxt)
            self.prev = torch.where(back, self.best_x, xa)
        return nxt

    def keep(self, mask: Tensor) -> None:
        for name in ("x0", "eta", "last_value", "best_value", "best_x", "improved"):
            setattr(self, name, getattr(self, name)[mask])
        self.ckpt_eta, self.ckpt_best = self.ckpt_eta[mask], self.ckpt_best[mask]
        if self.prev is not None:
            self.prev = self.prev[mask]

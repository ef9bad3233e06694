"""Per-example bookkeeping of the attack loop: each example's best iterate, its steps without
a usable gradient and its late objective gain (the raw material of the indicators of attack
failure, medsec.evaluation.indicators)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

LATE = 0.2  # the final share of a restart's steps that ``late_gain`` looks at


class Track:
    """Per-example bookkeeping of one batch: the best (highest-objective) iterate of each
    example, its steps without a usable gradient, and its late objective gain."""

    def __init__(self, x: Tensor) -> None:
        n = len(x)
        self.best_x = x.clone()
        self.best_value = torch.full((n,), -math.inf, device=x.device)
        self.bad = torch.zeros(n, device=x.device)
        self.steps = torch.zeros(n, device=x.device)
        self.late_gain = torch.zeros(n, device=x.device)
        self.first: dict[str, float] = {}

    def see(self, idx: Tensor, xa: Tensor, value: Tensor, grad: Tensor) -> Tensor:
        """Record one step of the examples ``idx``; returns grad with non-finite entries
        zeroed (they are counted, never silently used)."""
        flat = grad.flatten(1)
        finite = torch.isfinite(flat).all(1)
        zero = finite & (flat.abs().amax(1) == 0)
        if not self.first:
            norms = flat[finite].norm(dim=1)
            self.first = {
                "norm": float(norms.mean()) if len(norms) else 0.0,
                "zero": float(zero.float().mean()),
                "nonfinite": float((~finite).float().mean()),
            }
        self.bad[idx] += (~finite | zero).float()
        self.steps[idx] += 1
        v = value.detach().to(self.best_value.dtype)
        better = v > self.best_value[idx]
        self.best_value[idx[better]] = v[better]
        self.best_x[idx[better]] = xa.detach()[better]
        if not bool(finite.all()):
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        return grad

    def late(self, idx: Tensor, first: Tensor, late: Tensor, best: Tensor) -> None:
        """Share of the restart's gain (first -> best) made after the ``late`` mark."""
        gain = (best - first).clamp_min(0)
        tail = (best - late).clamp_min(0)
        self.late_gain[idx] = torch.where(gain > 0, tail / gain.clamp_min(1e-12), 0.0)

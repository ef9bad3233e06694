"""Gradient transforms that wrap any pipeline: EOT for randomness, BPDA for steps that have
no useful gradient. Both are explicit objects, recorded in every result that uses them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

ObjectiveFn = Callable[[Tensor, Tensor], Tensor]


class EOT:
    """Expectation over Transformation: the objective averaged over ``n`` random draws.

    The pipeline's own randomness (noise, dropout masks) supplies the draws. ``batched``
    evaluates all draws in one forward of n x the batch (fast on GPUs); otherwise a loop of
    n forwards (on these CPUs as fast, with 1/n of the memory). ``None`` picks by device.
    """

    def __init__(self, objective: ObjectiveFn, n: int, batched: bool | None = None) -> None:
        if n < 1:
            raise ValueError("EOT needs n >= 1 samples")
        self.objective = objective
        self.n = n
        self.batched = batched

    def __call__(self, x: Tensor, idx: Tensor) -> Tensor:
        batched = self.batched if self.batched is not None else x.is_cuda
        if self.n == 1:
            return self.objective(x, idx)
        if batched:
            reps = self.objective(x.repeat(self.n, *[1] * (x.ndim - 1)), idx.repeat(self.n))
            return reps.view(self.n, len(x)).mean(0)
        return torch.stack([self.objective(x, idx) for _ in range(self.n)]).mean(0)


class BPDA(nn.Module):
    """Backward Pass Differentiable Approximation around a module.

    Forward: exactly ``module(x)``. Backward: the gradient of ``approx(x)`` (identity by
    default, the right choice for a step that leaves images roughly unchanged, such as
    quantisation or denoising). Implemented as approx(x) + (module(x) - approx(x)).detach().
    """

    def __init__(self, module: nn.Module, approx: nn.Module | None = None) -> None:
        super().__init__()
        self.module = module
        self.approx = approx if approx is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            exact = self.module(x)
        if not x.requires_grad:
            return exact
        surrogate = self.approx(x)
        return surrogate + (exact - surrogate).detach()

    def extra_repr(self) -> str:
        return f"backward=gradient of {self.approx.__class__.__name__}"

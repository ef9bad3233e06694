"""Attack losses (all MAXIMISED by the attack) and their composition into an objective.

A loss term maps the pipeline's outputs, the labels it is measured against and the attack
mode to one value per example: ``term(out, labels, targeted) -> (B,)``. For an untargeted
attack ``labels`` are the true labels; for a targeted one they are the targets. Terms compose
with weights (a float, or a (B,) tensor for per-example weights such as a searched lambda):
``Objective(forward, [(1.0, margin()), (lam, detector_term)], labels)``.

Binary tasks are first class: every term works for 2-logit models, and single-logit models
are lifted to two logits by :func:`as_two_logits`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

Outputs = dict[str, Tensor]
Forward = Callable[[Tensor], Outputs]


class LossTerm(Protocol):
    """One per-example term of an attack objective (higher = better for the attacker)."""

    def __call__(self, out: Outputs, labels: Tensor, targeted: bool) -> Tensor: ...


def as_two_logits(logits: Tensor) -> Tensor:
    """(B,) or (B,1) single-logit output -> (B,2) logits [0, z]: softmax equals sigmoid."""
    if logits.ndim == 2 and logits.shape[1] >= 2:
        return logits
    z = logits.reshape(-1, 1)
    return torch.cat([torch.zeros_like(z), z], 1)


def logits_forward(pipeline: nn.Module) -> Forward:
    """Forward that exposes only the pipeline's logits (what most attacks need)."""
    return lambda x: {"logits": as_two_logits(pipeline(x))}


def _other_max(logits: Tensor, labels: Tensor) -> Tensor:
    """Largest logit among classes other than ``labels`` (exact for 2 classes too)."""
    masked = logits.masked_fill(nn.functional.one_hot(labels, logits.shape[1]).bool(), -math.inf)
    return masked.amax(1)


def cross_entropy() -> LossTerm:
    """CE to the true class (untargeted, maximised) or minus CE to the target (targeted)."""

    def term(out: Outputs, labels: Tensor, targeted: bool) -> Tensor:
        ce = nn.functional.cross_entropy(out["logits"], labels, reduction="none")
        return -ce if targeted else ce

    return term


def margin(kappa: float = math.inf) -> LossTerm:
    """Carlini-Wagner margin on logits, capped at ``kappa`` (confidence).

    Untargeted: max_{j != y} z_j - z_y. Targeted: z_t - max_{j != t} z_j. Once the margin
    reaches ``kappa`` its gradient vanishes, leaving the budget to other terms.
    """

    def term(out: Outputs, labels: Tensor, targeted: bool) -> Tensor:
        z = out["logits"]
        own = z.gather(1, labels[:, None])[:, 0]
        m = own - _other_max(z, labels) if targeted else _other_max(z, labels) - own
        return m.clamp(max=kappa) if math.isfinite(kappa) else m

    return term


LOSSES: dict[str, Callable[..., LossTerm]] = {"ce": cross_entropy, "margin": margin}


def create_loss(name: str, **kwargs: float) -> LossTerm:
    """A loss term by registry name (``ce``, ``margin``)."""
    from medsec.errors import MedsecError

    if name not in LOSSES:
        raise MedsecError(f"unknown loss {name!r}; choose one of {', '.join(sorted(LOSSES))}")
    return LOSSES[name](**kwargs)


Weight = float | Tensor


class Objective:
    """Weighted sum of loss terms on one forward pass, for a fixed batch of labels.

    Called as ``objective(x, idx)``: ``idx`` are the positions of ``x``'s rows in the full
    batch, so labels and per-example weights follow the examples as the attack drops the
    finished ones (and as EOT repeats them).
    """

    def __init__(
        self,
        forward: Forward,
        terms: Sequence[tuple[Weight, LossTerm]],
        labels: Tensor,
        targeted: bool = False,
    ) -> None:
        if not terms:
            raise ValueError("an objective needs at least one loss term")
        self.forward = forward
        self.terms = list(terms)
        self.labels = labels
        self.targeted = targeted

    def __call__(self, x: Tensor, idx: Tensor) -> Tensor:
        out = self.forward(x)
        labels = self.labels[idx]
        total = torch.zeros(len(x), device=x.device, dtype=x.dtype)
        for weight, term in self.terms:
            w = weight[idx] if isinstance(weight, Tensor) else weight
            total = total + w * term(out, labels, self.targeted)
        return total

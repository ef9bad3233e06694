"""PGD adversarial training (Madry et al. 2018), the honest baseline.

min_theta E max_{||d||_inf <= eps} CE(f(x + d), y): each minibatch is replaced by its PGD
adversarial examples (the engine's loop, random start, no early stop) and the classifier is
trained on them only. The deployed pipeline is the trained classifier.

Assumed: training eps = 4/255 (the study's target eps), 5 steps of 2.5 * eps / 5, starting
from the undefended victim's weights and fine-tuned with Adam for a CPU budget (Madry et al.
train from scratch for many epochs, so this baseline is weaker than theirs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medsec.attacks import AttackSpec, run_attack
from medsec.data.base import Dataset
from medsec.defences.robust.common import RobustTrainConfig, fit

TRAIN_EPS = 4 / 255
TRAIN_STEPS = 5


def train_pgd_at(
    model: nn.Module,
    data: Dataset,
    cfg: RobustTrainConfig,
    *,
    eps: float = TRAIN_EPS,
    steps: int = TRAIN_STEPS,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Fine-tune ``model`` in place on PGD examples; returns the training record."""
    spec = AttackSpec("pgd-at-train", eps, steps=steps, early_stop=False)

    def loss_fn(step: int, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        x_adv = run_attack(model, xb, yb, spec, seed=cfg.seed + step).x_adv.to(device)
        model.train()
        return nn.functional.cross_entropy(model(x_adv), yb)

    rec = fit(model, data, cfg, loss_fn, device=device)
    rec.update(train_attack=spec.record())
    return rec

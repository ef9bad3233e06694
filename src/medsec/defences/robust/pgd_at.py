"""PGD adversarial training (Madry et al. 2018), the honest baseline.

min_theta E max_{||d||_inf <= eps} CE(f(x + d), y): each minibatch is replaced by its PGD
adversarial examples (the engine's loop, random start, no early stop) and the classifier is
trained on them only. The deployed pipeline is the trained classifier.

Assumed: training eps = 4/255 (the study's target eps), 5 steps of 2.5 * eps / 5, starting
from the undefended victim's weights and fine-tuned with Adam for a CPU budget (Madry et al.
train from scratch for many epochs, so this baseline is weaker than theirs). The training eps
ramps up linearly from 0 over the first ``RAMP`` of the steps: started at full eps, the
fragile victim's adversarial loss (~20) collapsed training to a constant classifier (clean
accuracy 0.5 on fundus-lesion, measured).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from medsec.attacks import AttackSpec, run_attack
from medsec.data.base import Dataset
from medsec.defences.robust.common import RobustTrainConfig, count_steps, fit

TRAIN_EPS = 4 / 255
TRAIN_STEPS = 5
RAMP = 0.5  # share of the optimiser steps over which eps grows linearly from 0 to TRAIN_EPS


def train_pgd_at(
    model: nn.Module,
    data: Dataset,
    cfg: RobustTrainConfig,
    *,
    eps: float = TRAIN_EPS,
    steps: int = TRAIN_STEPS,
    ramp: float = RAMP,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Fine-tune ``model`` in place on PGD examples; returns the training record."""
    spec = AttackSpec("pgd-at-train", eps, steps=steps, early_stop=False)
    ramp_steps = max(1, round(ramp * count_steps(len(data.train.labels), cfg)))

    def loss_fn(step: int, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        now = replace(spec, eps=eps * min(1.0, (step + 1) / ramp_steps))
        x_adv = run_attack(model, xb, yb, now, seed=cfg.seed + step).x_adv.to(device)
        model.train()
        return nn.functional.cross_entropy(model(x_adv), yb)

    rec = fit(model, data, cfg, loss_fn, device=device)
    rec.update(train_attack=spec.record(), eps_ramp_steps=ramp_steps)
    return rec

"""SSAT: semi-supervised adversarial training (Li, Pan & Zhu, ISBI 2021).

Each step takes a labelled batch (x, y) and an unlabelled batch u: pseudo-labels
y_hat = argmax f(u), u_adv = FGSM(u, y_hat) with eps ~ U(0.001, 0.003), and
loss = CE(f(x), y) + 3 * CE(f(u_adv), y_hat). The deployed pipeline is the trained
classifier itself.

Assumed: (1) the training split is halved into a labelled and an unlabelled part (labels of
the second half are discarded); (2) one eps is drawn per batch (not per image); (3) the
classifier starts from the undefended victim's weights (their ResNet-18 started from
ImageNet weights) and is fine-tuned with Adam for a CPU budget instead of SGD for 10 epochs;
(4) FGSM is the engine's one-step preset, run in eval mode on the current weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medsec.attacks import preset, run_attack
from medsec.data.base import Dataset
from medsec.defences.robust.common import RobustTrainConfig, fit

EPS_RANGE = (0.001, 0.003)
ADV_WEIGHT = 3.0


def train_ssat(
    model: nn.Module,
    data: Dataset,
    cfg: RobustTrainConfig,
    *,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Fine-tune ``model`` in place with the SSAT loss; returns the training record."""
    x = torch.from_numpy(data.train.images)
    y = torch.from_numpy(data.train.labels)
    half = len(x) // 2
    unlabelled = x[half:]
    gen = torch.Generator().manual_seed(cfg.seed + 1)

    def loss_fn(step: int, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        pick = torch.randint(len(unlabelled), (len(xb),), generator=gen)
        u = unlabelled[pick].to(device)
        eps = float(torch.empty(1).uniform_(*EPS_RANGE, generator=gen))
        with torch.no_grad():
            model.eval()
            pseudo = model(u).argmax(1)
        u_adv = run_attack(model, u, pseudo, preset("fgsm", eps), seed=cfg.seed + step).x_adv
        model.train()
        clean = nn.functional.cross_entropy(model(xb), yb)
        adv = nn.functional.cross_entropy(model(u_adv.to(device)), pseudo)
        return clean + ADV_WEIGHT * adv

    rec = fit(model, data, cfg, loss_fn, device=device, x=x[:half], y=y[:half])
    rec.update(eps_range=list(EPS_RANGE), adv_weight=ADV_WEIGHT, labelled=half)
    return rec

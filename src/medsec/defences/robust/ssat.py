"""SSAT: semi-supervised adversarial training (Li, Pan & Zhu, ISBI 2021).

Each step takes a labelled batch (x, y) and an unlabelled batch u: pseudo-labels
y_hat = argmax f(u), u_adv = FGSM(u, y_hat) with eps ~ U(0.001, 0.003), and
loss = CE(f(x), y) + 3 * CE(f(u_adv), y_hat). The deployed pipeline is the trained
classifier itself.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from medsec.attacks import preset, run_attack
from medsec.data.base import Dataset
from medsec.defences import BuildEnv, Defence, Deployed, register_defence
from medsec.defences.robust.common import RobustTrainConfig, fit, paper_grid, train_config, trained

EPS_RANGE = (0.001, 0.003)
PAPER_EPS = (0.001, 0.002, 0.003)  # the FGSM budgets of the paper's own evaluation
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


@register_defence
class SSAT(Defence):
    name = "ssat"
    paper = (
        "Li, Pan & Zhu: Defending against adversarial attacks on medical imaging AI system, "
        "classification or detection?, ISBI 2021"
    )
    summary = "semi-supervised adversarial training"
    assumptions = (
        "the training split is halved into a labelled and an unlabelled part (labels of the "
        "second half are discarded)",
        "one eps is drawn per batch (not per image)",
        "the classifier starts from the undefended victim's weights (theirs from ImageNet) and "
        "is fine-tuned with Adam for 2 epochs (a CPU budget) instead of SGD for 10",
        "FGSM is the engine's one-step preset, run in eval mode on the current weights",
    )
    working_eps = EPS_RANGE[1]

    def build(self, victim: nn.Module, data: Dataset, env: BuildEnv) -> Deployed:
        model = copy.deepcopy(victim).to(env.device)
        cfg = train_config(env, epochs=2, lr=5e-4)
        rec = trained(
            env, self.name, model, cfg, lambda: train_ssat(model, data, cfg, device=env.device)
        )
        attacks = [preset("fgsm", e) for e in PAPER_EPS] + paper_grid(env.eps)
        return Deployed(model.eval(), paper_attacks=attacks, record=rec)

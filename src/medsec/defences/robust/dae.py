"""Denoising auto-encoder CNN in front of the classifier (Xue et al., MICCAI 2019).

Pipeline: x -> DAE -> classifier. Trained jointly on
reconstruction (MSE of DAE(x + noise) to the clean x) + feature invariance (MSE between the
classifier's penultimate features of the denoised noisy image and of the denoised clean
image) + cross-entropy (on the denoised noisy and denoised clean images).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from medsec.data.base import Dataset
from medsec.defences import BuildEnv, Defence, Deployed, register_defence
from medsec.defences.robust.common import RobustTrainConfig, fit, paper_grid, train_config, trained

NOISE_SIGMA = 0.1
WEIGHTS = {"reconstruction": 1.0, "feature_invariance": 0.1, "ce": 1.0}


class DenoisingAutoEncoder(nn.Module):
    """Residual conv encoder-decoder: predicts the noise and subtracts it."""

    def __init__(self, channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 3, 2, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, 2, 1),
            nn.ReLU(inplace=True),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(width, channels, 4, 2, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.decoder(self.encoder(x))).clamp(0, 1)


class DAEClassifier(nn.Module):
    """The deployed pipeline: denoiser then classifier; fully differentiable."""

    def __init__(self, dae: DenoisingAutoEncoder, classifier: nn.Module) -> None:
        super().__init__()
        self.dae = dae
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dae(x))

    def forward_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.classifier.forward_features(self.dae(x))


def train_dae(
    model: DAEClassifier,
    data: Dataset,
    cfg: RobustTrainConfig,
    *,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Train DAE and classifier jointly (see module docstring); returns the record."""
    gen = torch.Generator().manual_seed(cfg.seed + 2)

    def loss_fn(step: int, xb: Tensor, yb: Tensor) -> Tensor:
        noise = torch.randn(xb.shape, generator=gen).to(xb) * NOISE_SIGMA
        xn = (xb + noise).clamp(0, 1)
        both = model.dae(torch.cat([xn, xb]))
        rec_noisy = both[: len(xb)]
        logits, feats = model.classifier.forward_features(both)
        pen = feats["penultimate"]
        recon = nn.functional.mse_loss(rec_noisy, xb)
        invariance = nn.functional.mse_loss(pen[: len(xb)], pen[len(xb) :])
        ce = nn.functional.cross_entropy(logits, torch.cat([yb, yb]))
        return (
            WEIGHTS["reconstruction"] * recon
            + WEIGHTS["feature_invariance"] * invariance
            + WEIGHTS["ce"] * ce
        )

    rec = fit(model, data, cfg, loss_fn, device=device)
    rec.update(noise_sigma=NOISE_SIGMA, loss_weights=WEIGHTS)
    return rec


@register_defence
class DAE(Defence):
    name = "dae"
    paper = (
        "Xue et al.: Improving robustness of medical image diagnosis with denoising "
        "convolutional neural networks, MICCAI 2019"
    )
    summary = "denoising auto-encoder CNN in front of the classifier"
    assumptions = (
        f"Gaussian training noise sigma = {NOISE_SIGMA}",
        "a small residual conv encoder-decoder (two stride-2 convs, two transposed convs, the "
        "output is x minus the predicted noise, clamped to [0, 1])",
        "loss weights " + ", ".join(f"{v:g} ({k})" for k, v in WEIGHTS.items()),
        "the classifier starts from the undefended victim's weights, the DAE from scratch; "
        "Adam for 3 epochs",
    )
    working_eps = 1 / 255

    def build(self, victim: nn.Module, data: Dataset, env: BuildEnv) -> Deployed:
        torch.manual_seed(env.seed)
        model = DAEClassifier(DenoisingAutoEncoder(data.channels), copy.deepcopy(victim))
        model = model.to(env.device)
        cfg = train_config(env, epochs=3, lr=1e-3)
        rec = trained(
            env, self.name, model, cfg, lambda: train_dae(model, data, cfg, device=env.device)
        )
        return Deployed(model.eval(), paper_attacks=paper_grid(env.eps), transfer=True, record=rec)

"""Two plug-in fixtures for the verdict's honesty, on the blob task of ``conftest.blob_split``.

- ``ProvablyRobust`` replaces the victim with a matched filter: a normalised Gaussian blur
  (non-negative weights summing to at most 1), a soft global maximum (log-sum-exp at a low
  temperature), and a threshold. An L-inf perturbation of size eps moves every blurred pixel,
  hence the soft maximum, by at most eps, so an image whose statistic is further than eps from
  the threshold cannot be flipped by any attack, and the gradients are real (no masking). The
  verdict must be "partly robust".
- ``MasksGradients`` rounds the input to 4 grey levels before the victim: it only hides the
  gradient. The verdict must never be "partly robust".
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medsec.defences import Defence, Deployed

SIGMA = 2.8  # the blob's width in ``blob_split`` at 28 px (size / 10)


class SoftMax2d(nn.Module):
    """``T * logsumexp(x / T)`` over each image: 1-Lipschitz in L-inf like the maximum, but its
    gradient reaches every pixel (a hard maximum's jumps between peaks stall sign steps)."""

    def __init__(self, temperature: float = 0.005) -> None:
        super().__init__()
        self.t = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.t * torch.logsumexp(x.flatten(1) / self.t, dim=1, keepdim=True)


def matched_filter(threshold: float, sign: float, scale: float = 200.0) -> nn.Module:
    """Logits ``(-s, s) * scale * (softmax(blur(x)) - threshold)``, a 1-Lipschitz statistic."""
    k = 15
    r = torch.arange(k, dtype=torch.float32) - k // 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * SIGMA**2))
    blur = nn.Conv2d(1, 1, k, padding=k // 2, bias=False)
    readout = nn.Linear(1, 2)
    with torch.no_grad():
        blur.weight.copy_((g / g.sum())[None, None])
        readout.weight.copy_(torch.tensor([[-sign], [sign]]) * scale)
        readout.bias.copy_(torch.tensor([sign, -sign]) * scale * threshold)
    model = nn.Sequential(blur, SoftMax2d(), readout)
    return model.requires_grad_(False).eval()


def statistic(x: torch.Tensor) -> torch.Tensor:
    """The soft maximum of blur(x) per image, the value the matched filter thresholds."""
    return matched_filter(0.0, 1.0, scale=0.5)(x).diff(dim=1)[:, 0]


def midpoint(s: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(threshold, class-0 mean, class-1 mean) of the statistic ``s``: the midpoint rule."""
    m0, m1 = float(np.mean(s[y == 0])), float(np.mean(s[y == 1]))
    return (m0 + m1) / 2, m0, m1


class ProvablyRobust(Defence):
    name = "provably-robust-fixture"
    family = "robustification"
    paper = "test fixture: a matched filter with a certified L-inf margin"
    assumptions = ("threshold midway between the class means of the statistic (train split)",)
    working_eps = 2 / 255

    def build(self, victim, data, env):
        x = torch.from_numpy(data.train.images[:, :1])
        y = data.train.labels
        with torch.no_grad():
            s = statistic(x).numpy()
        t, m0, m1 = midpoint(s, y)
        model = matched_filter(t, 1.0 if m1 > m0 else -1.0).to(env.device)
        return Deployed(model, notes=[f"class means of the statistic {m0:.4f}, {m1:.4f}"])


class Quantise(nn.Module):
    """Round pixels to 4 levels: zero gradient almost everywhere, nothing else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 3) / 3


class MasksGradients(Defence):
    name = "masking-fixture"
    family = "robustification"
    paper = "test fixture: input quantisation, which only hides the gradient"
    assumptions = ("4 grey levels",)
    working_eps = 2 / 255

    def build(self, victim, data, env):
        return Deployed(victim, preprocess=Quantise())

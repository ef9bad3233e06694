"""Li & Zhu 2020: unsupervised detector - multivariate Gaussian models of clean deep features.

(assumed, from the abstract and follow-ups) For every named layer of the victim (stage
outputs reduced to channel means, as in Lee et al.'s Mahalanobis detector, and the
penultimate layer) and every class, a Gaussian is fitted to clean training features
(Ledoit-Wolf shrunk covariance: stable for 128-d features from ~2000 images per class).
Per layer the squared Mahalanobis distance to the predicted class is standardised by its
mean and spread on the clean training images (so layers of different width weigh alike);
the score is the mean over layers. Trained on clean data only; no adversarial examples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from medsec.attacks import LossTerm
from medsec.data.base import Dataset
from medsec.defences import BuildEnv, Defence, Deployed, FitData, register_defence
from medsec.defences.detection.adaptive import Hinge, detector_hinge
from medsec.defences.detection.base import Detector, Features, pooled, predicted_or


def fit_gaussian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and precision (inverse Ledoit-Wolf covariance) of the rows of ``x``."""
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf().fit(x)
    return lw.location_, lw.precision_


def mahalanobis_sq(x: Tensor, mean: Tensor, precision: Tensor) -> Tensor:
    """Squared Mahalanobis distance of each row of ``x`` (one model, or one per row)."""
    d = x - mean
    if precision.ndim == 2:
        return ((d @ precision) * d).sum(1)
    return torch.einsum("ni,nij,nj->n", d, precision, d)


class GaussianDetector(Detector):
    """Per-layer, per-class Gaussian models; standardised Mahalanobis score."""

    name = "li-zhu-mgm"
    differentiable = True

    def __init__(
        self,
        victim: nn.Module,
        layers: tuple[str, ...] | None = None,
        batch_size: int = 250,
        seed: int = 0,
    ) -> None:
        super().__init__(victim, batch_size, seed)
        self.layers = layers

    def fit(self, x_clean: Tensor, y_clean: Tensor, x_adv: Tensor | None = None) -> dict[str, Any]:
        """Fit every layer's class Gaussians, then standardise distances on the same images
        (unsupervised: ``x_adv`` is ignored)."""
        _, feats = self.extract(x_clean)
        self.layers_ = self.layers or tuple(feats)
        y = y_clean.numpy()
        dev = self.device
        self.means_: dict[str, Tensor] = {}
        self.precisions_: dict[str, Tensor] = {}
        for name in self.layers_:
            f = pooled(feats[name]).double().numpy()
            fits = [fit_gaussian(f[y == c]) for c in range(int(y.max()) + 1)]
            self.means_[name] = torch.tensor(np.stack([m for m, _ in fits]), device=dev).float()
            self.precisions_[name] = torch.tensor(
                np.stack([p for _, p in fits]), device=dev
            ).float()
        self.center_ = {n: 0.0 for n in self.layers_}
        self.spread_ = {n: 1.0 for n in self.layers_}
        raw = self.layer_distances({k: v.to(dev) for k, v in feats.items()}, y_clean.to(dev))
        for name, d in raw.items():
            self.center_[name] = float(d.mean())
            self.spread_[name] = float(d.std().clamp_min(1e-6))
        return {"layers": len(self.layers_)}

    def layer_distances(self, feats: Features, classes: Tensor) -> dict[str, Tensor]:
        """Standardised squared Mahalanobis distance to ``classes`` in every layer."""
        out = {}
        for name in self.layers_:
            m2 = mahalanobis_sq(
                pooled(feats[name]), self.means_[name][classes], self.precisions_[name][classes]
            )
            out[name] = (m2 - self.center_[name]) / self.spread_[name]
        return out

    def score_features(
        self, logits: Tensor, feats: Features, classes: Tensor | None = None
    ) -> Tensor:
        dist = self.layer_distances(feats, predicted_or(logits, classes))
        return torch.stack(list(dist.values()), 1).mean(1)


def mgm_terms(det: GaussianDetector, fit: FitData) -> tuple[list[tuple[float, LossTerm]], str]:
    """The Gaussian NLL of every monitored layer under the target class, hinged."""
    hinge = Hinge.from_clean(det.score_samples(fit.x_val).numpy())
    return (
        [(1.0, detector_hinge(det, hinge))],
        "Gaussian NLL of every monitored layer (target class), hinged",
    )


@register_defence
class LiZhuMGM(Defence):
    name = "li-zhu-mgm"
    family = "detection"
    paper = "Li & Zhu: Robust detection of adversarial attacks on medical images, ISBI 2020"
    summary = "unsupervised Gaussian models of deep features"
    assumptions = (
        "per-class Ledoit-Wolf Gaussians of channel-mean stage features and the penultimate "
        "layer; score = mean over layers of standardised squared Mahalanobis distance to the "
        "predicted class; clean training data only.",
    )
    working_eps = 1 / 255

    def build(self, victim: nn.Module, data: Dataset, env: BuildEnv) -> Deployed:
        det = GaussianDetector(victim, batch_size=env.batch_size, seed=env.seed)
        return Deployed(victim, detector=det, attack_terms=mgm_terms)

"""Ma et al. 2021 (after Feinman et al. 2017): kernel density + Bayesian uncertainty detector.

- KD: per-class Gaussian kernel density of the victim's penultimate (128-d) training
  features, bandwidth 1.0 (the paper's), evaluated as a log-density (log-sum-exp, as
  scikit-learn's ``KernelDensity.score_samples``) under the predicted class. Low = suspicious.
- BU: MC-dropout uncertainty, 50 stochastic passes, E[sum_k p_k^2] - sum_k E[p_k]^2.
  (assumed) Dropout sits only in the victim's head (dense -> Dropout -> Linear), so the 50
  passes re-use one trunk pass and redraw only the head's dropout masks: the same
  distribution as 50 full passes at 1/50 of the cost. The deployed detector draws its masks
  from a generator re-seeded on each call (reproducible flags); the differentiable score an
  attacker uses draws fresh masks on every call (EOT over dropout masks).
- Both characteristics min-max scaled and fed to cross-validated logistic regression.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from medsec.attacks import LossTerm
from medsec.data.base import Dataset
from medsec.defences import BuildEnv, Defence, Deployed, FitData, register_defence
from medsec.defences.detection.adaptive import Hinge, detector_hinge
from medsec.defences.detection.base import CharacteristicDetector, Features, predicted_or

BANDWIDTH = 1.0
MC_SAMPLES = 50


def kernel_log_density(points: Tensor, reference: Tensor, bandwidth: float = BANDWIDTH) -> Tensor:
    """log of the Gaussian KDE of ``reference`` at ``points``, normalised (sklearn's value)."""
    d = reference.shape[1]
    sq = torch.cdist(points, reference).pow(2)
    log_norm = math.log(len(reference)) + 0.5 * d * math.log(2 * math.pi * bandwidth**2)
    return torch.logsumexp(-sq / (2 * bandwidth**2), dim=1) - log_norm


def mc_dropout_uncertainty(
    penultimate: Tensor,
    classifier: nn.Module,
    p: float,
    samples: int = MC_SAMPLES,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Feinman's BU: E[sum_k p_k^2] - sum_k E[p_k]^2 over ``samples`` dropout masks."""
    reps = penultimate.unsqueeze(0).expand(samples, *penultimate.shape)
    keep = torch.rand(reps.shape, generator=generator, device="cpu").to(reps.device) >= p
    probs = torch.softmax(classifier(reps * keep / (1 - p)), -1)
    return probs.pow(2).sum(-1).mean(0) - probs.mean(0).pow(2).sum(-1)


class KDBUDetector(CharacteristicDetector):
    """KD + BU, min-max scaled, logistic regression (see module docstring)."""

    name = "ma-kd-bu"

    def __init__(
        self,
        victim: nn.Module,
        bandwidth: float = BANDWIDTH,
        mc_samples: int = MC_SAMPLES,
        batch_size: int = 250,
        seed: int = 0,
    ) -> None:
        super().__init__(victim, batch_size, seed)
        self.bandwidth = bandwidth
        self.mc_samples = mc_samples

    def fit_reference(self, x_ref: Tensor, y_ref: Tensor, seed: int = 0) -> None:
        """Keep the penultimate features of clean reference (training) images per class."""
        _, feats = self.extract(x_ref)
        pen = feats["penultimate"].to(self.device)
        self.reference_ = [pen[y_ref.to(self.device) == c] for c in range(int(y_ref.max()) + 1)]

    def kd(self, penultimate: Tensor, classes: Tensor) -> Tensor:
        """Log kernel density of each row under the KDE of its class."""
        out = torch.zeros(len(penultimate), device=penultimate.device)
        for c, ref in enumerate(self.reference_):
            rows = classes == c
            if rows.any():
                out = out.index_put(
                    (rows.nonzero()[:, 0],),
                    kernel_log_density(penultimate[rows], ref, self.bandwidth),
                )
        return out

    def bu(self, penultimate: Tensor, fresh: bool = False) -> Tensor:
        """BU with the deployed (re-seeded) masks, or ``fresh`` random ones (EOT)."""
        gen = None if fresh else torch.Generator().manual_seed(0)
        dropout = self.victim.dropout.p
        return mc_dropout_uncertainty(
            penultimate, self.victim.classifier, dropout, self.mc_samples, gen
        )

    def characteristics(
        self, logits: Tensor, feats: Features, classes: Tensor | None, fresh: bool = False
    ) -> Tensor:
        pen = feats["penultimate"]
        kd = self.kd(pen, predicted_or(logits, classes))
        return torch.stack([kd, self.bu(pen, fresh)], 1)

    def attack_score(self, logits: Tensor, feats: Features, classes: Tensor) -> Tensor:
        """Target-class KD and BU over 50 fresh dropout masks per call (EOT over masks)."""
        c = self.characteristics(logits, feats, classes, fresh=True)
        return self.head(c)


def kd_bu_terms(det: KDBUDetector, fit: FitData) -> tuple[list[tuple[float, LossTerm]], str]:
    """The detector's own score, hinged: target-class KD and BU over fresh masks (EOT)."""
    hinge = Hinge.from_clean(det.score_samples(fit.x_val).numpy())
    return (
        [(1.0, detector_hinge(det, hinge))],
        "LR(target-class KD, BU over 50 fresh dropout masks per step = EOT), hinged",
    )


@register_defence
class MaKDBU(Defence):
    name = "ma-kd-bu"
    family = "detection"
    paper = (
        "Ma, Niu, Gu, Wang, Zhao, Bailey, Lu: Understanding adversarial attacks on deep "
        "learning based medical image analysis systems, Pattern Recognition 2021"
    )
    summary = "kernel density + MC-dropout uncertainty, logistic regression"
    assumptions = (
        f"KD: per-class Gaussian KDE of penultimate training features, bandwidth {BANDWIDTH}, "
        "log-density under the predicted class.",
        f"BU: {MC_SAMPLES} MC-dropout passes of the head (the only dropout), masks re-seeded "
        "per call when deployed, fresh for the attacker (EOT).",
    )
    working_eps = 1 / 255

    def build(self, victim: nn.Module, data: Dataset, env: BuildEnv) -> Deployed:
        det = KDBUDetector(victim, batch_size=env.batch_size, seed=env.seed)
        return Deployed(victim, detector=det, attack_terms=kd_bu_terms)

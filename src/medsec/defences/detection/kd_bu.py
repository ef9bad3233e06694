"""Ma et al. 2021 (after Feinman et al. 2017): kernel density + Bayesian uncertainty detector.

- KD: per-class Gaussian kernel density of the victim's penultimate (128-d) training
  features, bandwidth 1.0 (the paper's), evaluated as a log-density (log-sum-exp, as
  scikit-learn's ``KernelDensity.score_samples``) under the predicted class. Low = suspicious.
- BU: MC-dropout uncertainty, 50 stochastic passes, E[sum_k p_k^2] - sum_k E[p_k]^2.
  (assumed) Dropout sits only in the victim's head (dense -> Dropout -> Linear), so the 50
  passes re-use one trunk pass and redraw only the head's dropout masks: the same
  distribution as 50 full passes at 1/50 of the cost. The deployed detector uses 50 fixed
  masks shared by every image (drawn once from a seeded generator), so an image's flag is a
  function of that image alone: per-row masks drawn per call made BU depend on the batch
  (measured in a review: 0.0032 in a batch of 5, 0.0049 alone; 2 of 198 flags flipped when
  a batch was reordered). The differentiable score an attacker uses draws fresh masks per
  row on every call (EOT over dropout masks).
- Both characteristics min-max scaled and fed to cross-validated logistic regression.
"""

from __future__ import annotations

import copy
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


def kernel_log_density(
    points: Tensor, reference: Tensor, bandwidth: float = BANDWIDTH, exact: bool = False
) -> Tensor:
    """log of the Gaussian KDE of ``reference`` at ``points``, normalised (sklearn's value).

    ``exact``: distances pair by pair. The default matrix-product form is 5-6x faster (the
    attacker's many calls) but off by ~1e-3 at these distances, by an amount that depends on
    the batch; the deployed detector needs a row's score to be a function of that row."""
    d = reference.shape[1]
    mode = "donot_use_mm_for_euclid_dist" if exact else "use_mm_for_euclid_dist_if_necessary"
    sq = torch.cdist(points, reference, compute_mode=mode).pow(2)
    log_norm = math.log(len(reference)) + 0.5 * d * math.log(2 * math.pi * bandwidth**2)
    return torch.logsumexp(-sq / (2 * bandwidth**2), dim=1) - log_norm


def mc_dropout_uncertainty(
    penultimate: Tensor,
    classifier: nn.Module,
    p: float,
    samples: int = MC_SAMPLES,
    generator: torch.Generator | None = None,
    shared: bool = False,
) -> Tensor:
    """Feinman's BU: E[sum_k p_k^2] - sum_k E[p_k]^2 over ``samples`` dropout masks, drawn
    per row or (``shared``) one set for every row."""
    reps = penultimate.unsqueeze(0).expand(samples, *penultimate.shape)
    shape = (samples, 1, *penultimate.shape[1:]) if shared else reps.shape
    keep = torch.rand(shape, generator=generator, device="cpu").to(reps.device) >= p
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
        self._head64: nn.Module | None = None  # float64 copy of the head for deployed BU

    def fit_reference(self, x_ref: Tensor, y_ref: Tensor, seed: int = 0) -> None:
        """Keep the penultimate features of clean reference (training) images per class."""
        _, feats = self.extract(x_ref)
        pen = feats["penultimate"].to(self.device)
        self.reference_ = [pen[y_ref.to(self.device) == c] for c in range(int(y_ref.max()) + 1)]

    def kd(self, penultimate: Tensor, classes: Tensor, exact: bool = True) -> Tensor:
        """Log kernel density of each row under the KDE of its class (``exact``: see
        :func:`kernel_log_density`)."""
        out = torch.zeros(len(penultimate), device=penultimate.device)
        for c, ref in enumerate(self.reference_):
            rows = classes == c
            if rows.any():
                out = out.index_put(
                    (rows.nonzero()[:, 0],),
                    kernel_log_density(penultimate[rows], ref, self.bandwidth, exact),
                )
        return out

    def bu(self, penultimate: Tensor, fresh: bool = False) -> Tensor:
        """BU with the deployed fixed masks (shared by all rows), or ``fresh`` random ones
        per row (EOT)."""
        dropout = self.victim.dropout.p
        if fresh:
            return mc_dropout_uncertainty(
                penultimate, self.victim.classifier, dropout, self.mc_samples
            )
        # float64: BU is a small difference of moments (~1e-3), whose float32 rounding
        # (~2e-7, different per batch) the scaler magnified to ~2e-3 in the score
        if self._head64 is None:
            self._head64 = copy.deepcopy(self.victim.classifier).double().to(penultimate.device)
        gen = torch.Generator().manual_seed(0)
        bu = mc_dropout_uncertainty(
            penultimate.double(), self._head64, dropout, self.mc_samples, gen, shared=True
        )
        return bu.to(penultimate.dtype)

    def characteristics(
        self, logits: Tensor, feats: Features, classes: Tensor | None, fresh: bool = False
    ) -> Tensor:
        pen = feats["penultimate"]
        kd = self.kd(pen, predicted_or(logits, classes), exact=not fresh)
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
        f"BU: {MC_SAMPLES} MC-dropout passes of the head (the only dropout), the deployed "
        "detector's 50 masks fixed and shared by every image (its flags do not depend on the "
        "batch), fresh per image and call for the attacker (EOT).",
    )
    working_eps = 1 / 255

    def build(self, victim: nn.Module, data: Dataset, env: BuildEnv) -> Deployed:
        det = KDBUDetector(victim, batch_size=env.batch_size, seed=env.seed)
        return Deployed(victim, detector=det, attack_terms=kd_bu_terms)

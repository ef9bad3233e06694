"""Ma et al. (2018; 2021 for medical images): local intrinsic dimensionality detector.

LID by maximum likelihood, ``-k / sum_i log(d_i / d_k)`` over the k = 20 nearest neighbours,
estimated against a minibatch of 100 clean images, for every named layer of the victim
(flattened stage outputs, the penultimate layer and the logits), then min-max scaled and
fed to logistic regression.
(assumed) At deployment one image arrives at a time, so its "minibatch" is a fixed random
sample of 100 clean training images (never the scored image itself); the same reference
batch is used for fitting and scoring, which also makes the score deterministic and
differentiable (the adaptive attacker differentiates it directly).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medsec.attacks import LossTerm
from medsec.data.base import Dataset
from medsec.defences import BuildEnv, Defence, Deployed, FitData, register_defence
from medsec.defences.detection.adaptive import Hinge, detector_hinge, gmm_matching, layer_gmms
from medsec.defences.detection.base import CharacteristicDetector, Features

K_NEIGHBOURS = 20
MINIBATCH = 100


def lid_mle(points: Tensor, reference: Tensor, k: int = K_NEIGHBOURS) -> Tensor:
    """MLE of LID of each row of ``points`` from its k nearest rows of ``reference``."""
    d = torch.cdist(points.flatten(1), reference.flatten(1))
    knn = d.topk(k, dim=1, largest=False).values.clamp_min(1e-12)
    return -k / torch.log(knn / knn[:, -1:]).sum(1).clamp(max=-1e-12)


class LIDDetector(CharacteristicDetector):
    """Per-layer LID characteristics + logistic regression (see module docstring)."""

    name = "ma-lid"

    def __init__(
        self,
        victim: nn.Module,
        k: int = K_NEIGHBOURS,
        minibatch: int = MINIBATCH,
        batch_size: int = 250,
        seed: int = 0,
    ) -> None:
        super().__init__(victim, batch_size, seed)
        self.k = k
        self.minibatch = minibatch

    def fit_reference(self, x_ref: Tensor, y_ref: Tensor, seed: int = 0) -> None:
        """Draw the fixed clean minibatch and keep its features for every layer."""
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(x_ref), generator=gen)[: self.minibatch]
        logits, feats = self.extract(x_ref[pick])
        self.reference_ = {n: f.flatten(1).to(self.device) for n, f in feats.items()}
        self.reference_["logits"] = logits.to(self.device)

    def characteristics(self, logits: Tensor, feats: Features, classes: Tensor | None) -> Tensor:
        layers = {**feats, "logits": logits}
        return torch.stack(
            [lid_mle(layers[n], ref, self.k) for n, ref in self.reference_.items()], 1
        )


def lid_terms(det: LIDDetector, fit: FitData) -> tuple[list[tuple[float, LossTerm]], str]:
    """Batch-LID differentiated directly + per-layer GMM feature matching, both hinged."""
    hinge = Hinge.from_clean(det.score_samples(fit.x_val).numpy())
    return (
        [(1.0, detector_hinge(det, hinge)), (1.0, gmm_matching(layer_gmms(det, fit)))],
        "LR(batch-LID of every layer) differentiated directly + per-layer GMM "
        "feature matching (HFC), both hinged",
    )


@register_defence
class MaLID(Defence):
    name = "ma-lid"
    family = "detection"
    paper = "Ma et al., Pattern Recognition 2021 (LID after Ma et al., ICLR 2018)"
    summary = f"local intrinsic dimensionality (k={K_NEIGHBOURS}), logistic regression"
    assumptions = (
        f"the minibatch of {MINIBATCH} clean neighbours is a fixed random sample of training "
        f"images; LID (k = {K_NEIGHBOURS}) of every named layer and the logits.",
    )
    working_eps = 1 / 255

    def build(self, victim: nn.Module, data: Dataset, env: BuildEnv) -> Deployed:
        det = LIDDetector(victim, batch_size=env.batch_size, seed=env.seed)
        return Deployed(victim, detector=det, attack_terms=lid_terms)

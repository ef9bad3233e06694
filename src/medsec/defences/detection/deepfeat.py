"""Ma et al. 2021: deep-feature detector - a random forest (30 trees) on penultimate features.

Trained on clean vs adversarial penultimate features of training images; score = the
forest's adversarial-class probability. Not differentiable: the adaptive attacker trains a
differentiable MLP surrogate on the same features (see ``adaptive.py``) and adds per-layer
GMM feature matching.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from medsec.attacks import LossTerm
from medsec.data.base import Dataset
from medsec.defences import BuildEnv, Defence, Deployed, FitData, register_defence
from medsec.defences.detection.adaptive import (
    Hinge,
    Surrogate,
    gmm_matching,
    layer_gmms,
    surrogate_hinge,
)
from medsec.defences.detection.base import Detector, Features
from medsec.errors import MedsecError

N_TREES = 30


class DeepFeatureDetector(Detector):
    """Random forest on the victim's penultimate features (see module docstring)."""

    name = "ma-deepfeat"
    differentiable = False
    supervised = True

    def __init__(
        self, victim: nn.Module, n_trees: int = N_TREES, seed: int = 0, batch_size: int = 250
    ) -> None:
        super().__init__(victim, batch_size, seed)
        self.n_trees = n_trees

    def fit(self, x_clean: Tensor, y_clean: Tensor, x_adv: Tensor | None = None) -> dict[str, Any]:
        """Fit the forest on the clean fit images vs ``x_adv``; returns its out-of-bag AUC."""
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.metrics import roc_auc_score

        if x_adv is None or len(x_adv) == 0:
            raise MedsecError(f"{self.name} is supervised: fit needs adversarial images")
        clean = self.extract(self.split(x_clean, x_adv)[1])[1]["penultimate"].numpy()
        adv = self.extract(x_adv)[1]["penultimate"].numpy()
        feats = np.concatenate([clean, adv])
        labels = np.r_[np.zeros(len(clean)), np.ones(len(adv))]
        self.forest_ = RandomForestClassifier(
            n_estimators=self.n_trees, oob_score=True, random_state=self.seed, n_jobs=1
        ).fit(feats, labels)
        oob = np.nan_to_num(self.forest_.oob_decision_function_[:, 1], nan=0.5)
        return {"fit_oob_auc": float(roc_auc_score(labels, oob))}

    def score_features(
        self, logits: Tensor, feats: Features, classes: Tensor | None = None
    ) -> Tensor:
        pen = feats["penultimate"].detach().cpu().numpy()
        return torch.from_numpy(self.forest_.predict_proba(pen)[:, 1]).float()


def deepfeat_terms(
    det: DeepFeatureDetector, fit: FitData
) -> tuple[list[tuple[float, LossTerm]], str]:
    """An MLP surrogate of the forest (same features) + per-layer GMM matching, hinged."""
    assert fit.x_adv is not None
    sur = Surrogate(128)
    pen = "penultimate"
    acc = sur.fit(det.extract(fit.x_fit)[1][pen], det.extract(fit.x_adv)[1][pen], seed=fit.seed)
    with torch.no_grad():
        s_val = sur.score(det.extract(fit.x_val)[1]).numpy()
    sur.to(fit.device)  # the attacker's features live there
    return (
        [
            (1.0, surrogate_hinge(sur, Hinge.from_clean(s_val))),
            (1.0, gmm_matching(layer_gmms(det, fit))),
        ],
        f"MLP surrogate of the forest (same features; train accuracy {acc:.3f}) + per-layer "
        "GMM feature matching (HFC), both hinged",
    )


@register_defence
class MaDeepFeat(Defence):
    name = "ma-deepfeat"
    family = "detection"
    paper = "Ma et al., Pattern Recognition 2021 (deep-feature random forest)"
    summary = f"random forest ({N_TREES} trees) on deep features"
    assumptions = (
        f"random forest ({N_TREES} trees) on penultimate features; the attacker uses an "
        "MLP surrogate trained on the same features plus per-layer GMM feature matching.",
    )
    working_eps = 1 / 255

    def build(self, victim: nn.Module, data: Dataset, env: BuildEnv) -> Deployed:
        det = DeepFeatureDetector(victim, seed=env.seed, batch_size=env.batch_size)
        return Deployed(victim, detector=det, attack_terms=deepfeat_terms)

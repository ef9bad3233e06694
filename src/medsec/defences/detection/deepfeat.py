"""Ma et al. 2021: deep-feature detector - a random forest (30 trees) on penultimate features.

Trained on clean vs adversarial penultimate features of training images; score = the
forest's adversarial-class probability. Not differentiable: the adaptive attacker trains a
differentiable surrogate on the same features (see ``adaptive.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from medsec.defences.detection.base import Detector, Features

N_TREES = 30


class DeepFeatureDetector(Detector):
    """Random forest on the victim's penultimate features (see module docstring)."""

    name = "ma-deepfeat"
    differentiable = False

    def __init__(
        self, victim: nn.Module, n_trees: int = N_TREES, seed: int = 0, batch_size: int = 250
    ) -> None:
        super().__init__(victim, batch_size)
        self.n_trees = n_trees
        self.seed = seed

    def fit(self, x_clean: Tensor, x_adv: Tensor) -> dict[str, float]:
        """Fit the forest; returns its out-of-bag AUC on the fit data."""
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.metrics import roc_auc_score

        clean = self.extract(x_clean)[1]["penultimate"].numpy()
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

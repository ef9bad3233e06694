"""The detector interface shared by every detection defence (scikit-learn outlier habits).

A detector watches a victim's deep features. ``fit(x_clean, y_clean, x_adv=None)`` learns
from clean training images and, for a ``supervised`` detector, the adversarial versions of
the LAST ``len(x_adv)`` clean images (``x_adv[i]`` is ``x_clean[-len(x_adv) + i]`` attacked;
the other clean images are the detector's reference, e.g. its densities, so fit images never
score themselves). ``score_samples(x)`` is higher for more suspicious inputs,
``set_threshold`` fixes the threshold at a false-positive rate on clean validation images
(5% by default, never changed afterwards), and ``flags(x)`` is what the deployed system does.
``score_features`` computes the score from one ``victim.forward_features`` pass; where it is
differentiable (``differentiable = True``) the adaptive attacker uses it directly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from medsec.errors import MedsecError

CLEAN_FPR = 0.05  # threshold: 5% false positives on clean validation images
Features = dict[str, Tensor]


def pooled(feature: Tensor) -> Tensor:
    """(N, C, H, W) stage output -> (N, C) channel means; (N, D) vectors pass unchanged."""
    return feature.mean((2, 3)) if feature.ndim == 4 else feature


def threshold_at_fpr(clean_scores: np.ndarray, fpr: float = CLEAN_FPR) -> float:
    """Smallest threshold t with mean(clean_scores > t) <= fpr (ties never push FPR above)."""
    s = np.sort(np.asarray(clean_scores, dtype=np.float64))
    if len(s) == 0:
        raise MedsecError("cannot set a detector threshold without clean validation scores")
    allowed = int(np.floor(fpr * len(s)))
    return float(s[len(s) - allowed - 1])


class Detector:
    """Base class: batching, threshold at a clean FPR, flags. Subclasses score features."""

    name = "detector"
    differentiable = False
    supervised = False  # fit needs adversarial examples

    def __init__(self, victim: nn.Module, batch_size: int = 250, seed: int = 0) -> None:
        self.victim = victim
        self.batch_size = batch_size
        self.seed = seed
        self.threshold_: float | None = None

    @property
    def device(self) -> torch.device:
        return next(self.victim.parameters()).device

    def forward_features(self, x: Tensor) -> tuple[Tensor, Features]:
        """Victim logits and named features, victim in eval mode (as deployed)."""
        was = self.victim.training
        self.victim.eval()
        try:
            return self.victim.forward_features(x.to(self.device))
        finally:
            self.victim.train(was)

    @torch.no_grad()
    def extract(self, x: Tensor) -> tuple[Tensor, Features]:
        """Batched, gradient-free forward_features over many images (results on CPU)."""
        logits, feats = [], []
        for s in range(0, len(x), self.batch_size):
            lo, fe = self.forward_features(x[s : s + self.batch_size])
            logits.append(lo.cpu())
            feats.append({k: v.cpu() for k, v in fe.items()})
        return torch.cat(logits), {k: torch.cat([f[k] for f in feats]) for k in feats[0]}

    def fit(self, x_clean: Tensor, y_clean: Tensor, x_adv: Tensor | None = None) -> dict[str, Any]:
        """Learn from clean images (+ adversarial ones if supervised); returns fit facts."""
        raise NotImplementedError

    @staticmethod
    def split(x_clean: Tensor, x_adv: Tensor | None) -> tuple[Tensor, Tensor]:
        """(reference images, clean fit images): the clean images ``x_adv`` pairs with."""
        n = 0 if x_adv is None else len(x_adv)
        if n == 0:
            return x_clean, x_clean[:0]
        if n > len(x_clean):
            raise MedsecError("more adversarial fit images than clean ones")
        return x_clean[:-n], x_clean[-n:]

    def score_features(
        self, logits: Tensor, feats: Features, classes: Tensor | None = None
    ) -> Tensor:
        """Suspicion score (N,) from one forward pass; ``classes`` None = predicted class."""
        raise NotImplementedError

    def attack_score(self, logits: Tensor, feats: Features, classes: Tensor) -> Tensor:
        """The differentiable score an informed attacker optimises (by default the deployed
        one; a randomised detector draws fresh randomness here, i.e. EOT)."""
        return self.score_features(logits, feats, classes)

    @torch.no_grad()
    def score_samples(self, x: Tensor) -> Tensor:
        """Suspicion score of each image (higher = more likely adversarial), on CPU."""
        out = []
        for s in range(0, len(x), self.batch_size):
            logits, feats = self.forward_features(x[s : s + self.batch_size])
            out.append(self.score_features(logits, feats).detach().float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def set_threshold(self, x_clean_val: Tensor, fpr: float = CLEAN_FPR) -> float:
        """Fix the threshold at ``fpr`` false positives on clean validation images."""
        self.threshold_ = threshold_at_fpr(self.score_samples(x_clean_val).numpy(), fpr)
        return self.threshold_

    @property
    def threshold(self) -> float:
        if self.threshold_ is None:
            raise MedsecError(f"{self.name}: threshold not set; call set_threshold first")
        return self.threshold_

    def flagged(self, scores: Tensor) -> Tensor:
        """Bool: which of these scores the deployed detector flags (the one rule)."""
        return scores > self.threshold

    def flags(self, x: Tensor) -> Tensor:
        """Bool (N,): flagged as adversarial at the fixed threshold (on x's device)."""
        return self.flagged(self.score_samples(x)).to(x.device)


def predicted_or(logits: Tensor, classes: Tensor | None) -> Tensor:
    """The given classes, or the victim's predicted classes (no gradient through argmax)."""
    return logits.detach().argmax(1) if classes is None else classes.to(logits.device)


class CharacteristicDetector(Detector):
    """Ma et al.'s recipe: per-image characteristics, min-max scaled, logistic regression.

    Subclasses compute ``characteristics`` (N, d) in torch (differentiable where the
    characteristic is); the fitted scaler and regression are kept as torch tensors so the
    score (the regression's decision value) is differentiable end to end.
    """

    differentiable = True
    supervised = True

    def fit_reference(self, x_ref: Tensor, y_ref: Tensor, seed: int) -> None:
        """Learn what the characteristics compare against (densities, a clean batch)."""
        raise NotImplementedError

    def fit(self, x_clean: Tensor, y_clean: Tensor, x_adv: Tensor | None = None) -> dict[str, Any]:
        """Reference from the other clean images, then the regression on fit characteristics."""
        if x_adv is None or len(x_adv) == 0:
            raise MedsecError(f"{self.name} is supervised: fit needs adversarial images")
        x_ref, x_fit = self.split(x_clean, x_adv)
        self.fit_reference(x_ref, y_clean[: len(x_ref)], self.seed)
        return self.fit_head(self.characteristics_of(x_fit), self.characteristics_of(x_adv))

    def characteristics(self, logits: Tensor, feats: Features, classes: Tensor | None) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def characteristics_of(self, x: Tensor) -> Tensor:
        """Characteristics of many images (batched, CPU)."""
        out = []
        for s in range(0, len(x), self.batch_size):
            logits, feats = self.forward_features(x[s : s + self.batch_size])
            out.append(self.characteristics(logits, feats, None).cpu())
        return torch.cat(out)

    def fit_head(self, clean: Tensor, adversarial: Tensor) -> dict[str, float]:
        """Min-max scale on all fit characteristics, then cross-validated logistic regression.

        Returns the regression's held-out-fold AUC (the papers' detection AUC on fit data).
        """
        from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
        from sklearn.model_selection import cross_val_score

        feats = torch.cat([clean, adversarial]).double().numpy()
        labels = np.r_[np.zeros(len(clean)), np.ones(len(adversarial))]
        lo, hi = feats.min(0), feats.max(0)
        span = np.where(hi > lo, hi - lo, 1.0)
        scaled = (feats - lo) / span
        lr = LogisticRegressionCV(
            cv=5, max_iter=2000, scoring="roc_auc", l1_ratios=(0.0,), use_legacy_attributes=False
        ).fit(scaled, labels)
        c = float(np.ravel(lr.C_)[0])
        cv_auc = cross_val_score(
            LogisticRegression(C=c, max_iter=2000), scaled, labels, cv=5, scoring="roc_auc"
        ).mean()
        dev = self.device
        self.lo_ = torch.tensor(lo, dtype=torch.float32, device=dev)
        self.span_ = torch.tensor(span, dtype=torch.float32, device=dev)
        self.coef_ = torch.tensor(lr.coef_[0], dtype=torch.float32, device=dev)
        self.intercept_ = float(lr.intercept_[0])
        return {"fit_cv_auc": float(cv_auc), "C": c}

    def score_features(
        self, logits: Tensor, feats: Features, classes: Tensor | None = None
    ) -> Tensor:
        return self.head(self.characteristics(logits, feats, classes))

    def head(self, characteristics: Tensor) -> Tensor:
        """Decision value of the fitted scaler + logistic regression."""
        return ((characteristics - self.lo_) / self.span_) @ self.coef_ + self.intercept_

"""Detection defences (Ma et al. 2021; Li & Zhu 2020) and the informed attacker's loss terms.

Each detector's file holds its Detector and its registered Defence; the generic evaluator
(medsec.evaluation.detection) fits, thresholds and attacks any of them.
"""

from medsec.defences.detection.base import CLEAN_FPR, Detector, threshold_at_fpr
from medsec.defences.detection.deepfeat import DeepFeatureDetector
from medsec.defences.detection.kd_bu import KDBUDetector
from medsec.defences.detection.lid import LIDDetector
from medsec.defences.detection.mgm import GaussianDetector

__all__ = [
    "CLEAN_FPR",
    "DeepFeatureDetector",
    "Detector",
    "GaussianDetector",
    "KDBUDetector",
    "LIDDetector",
    "threshold_at_fpr",
]

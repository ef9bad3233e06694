"""Robustification defences (SSAT, kernelized manifold mapping, denoising auto-encoder CNN,
MedRDF, PGD adversarial training), each an nn.Module pipeline with its training function.

Every pipeline takes images in [0, 1] and returns logits, with all preprocessing, randomness
and voting inside, so an attack sees exactly what is deployed. Each file also registers its
Defence (family ``robustification``); the generic evaluator is medsec.evaluation.robust.
"""

from medsec.defences.robust.common import RobustTrainConfig
from medsec.defences.robust.dae import DAEClassifier, DenoisingAutoEncoder, train_dae
from medsec.defences.robust.kmm import KernelMapping, KMMNet, train_kmm
from medsec.defences.robust.medrdf import (
    MajorityVote,
    MedRDF,
    MedRDFAttackView,
    RobustMetricReject,
    SoftVote,
)
from medsec.defences.robust.pgd_at import reinitialised, train_pgd_at
from medsec.defences.robust.ssat import train_ssat

__all__ = [
    "DAEClassifier",
    "DenoisingAutoEncoder",
    "KMMNet",
    "KernelMapping",
    "MajorityVote",
    "MedRDF",
    "MedRDFAttackView",
    "RobustMetricReject",
    "RobustTrainConfig",
    "SoftVote",
    "reinitialised",
    "train_dae",
    "train_kmm",
    "train_pgd_at",
    "train_ssat",
]

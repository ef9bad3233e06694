"""The signature gate as a study entry: the remedy, evaluated over every adversarial image of
the run (medsec.evaluation.gate), with the victim behind it."""

from __future__ import annotations

from torch import nn

from medsec.data.base import Dataset
from medsec.defences import register_defence
from medsec.defences.base import BuildEnv, Defence, Deployed


@register_defence
class SignatureGate(Defence):
    name = "signature-gate"
    family = "integrity"
    paper = (
        "Levy, Amit, Elovici, Mirsky: The security of deep learning defences for medical "
        "imaging, 2022 (the remedy: DICOM PS3.15 signatures verified before the model)"
    )
    summary = "signed DICOM verified before the model, over every adversarial image kept"

    def build(self, victim: nn.Module, data: Dataset, env: BuildEnv) -> Deployed:
        return Deployed(victim)

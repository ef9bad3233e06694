"""The undefended victim as a study entry: the reference every defence is compared with."""

from __future__ import annotations

from torch import nn

from medsec.data.base import Dataset
from medsec.defences import register_defence
from medsec.defences.base import BuildEnv, Defence, Deployed


@register_defence
class Undefended(Defence):
    name = "none"
    family = "none"
    summary = "undefended victim: the attack grid and its sanity checks"

    def build(self, victim: nn.Module, data: Dataset, env: BuildEnv) -> Deployed:
        return Deployed(victim)

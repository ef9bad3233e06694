"""The defence contract: what a defence (built-in or a user's plug-in) declares and builds.

A defence is one file holding one :class:`Defence` subclass. It states its paper, every
parameter its paper did not give (``assumptions``), the budget its paper claims it works at
(``working_eps``), and ``build(victim, data, env) -> Deployed``: the deployed pipeline, an
optional preprocess and detector, its paper's own (non-adaptive) attacks, and the parts an
informed attacker uses against it. The study's generic evaluator (medsec.evaluation) turns
any Defence into rows, checks, notes and figures; nothing in the study names a defence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from medsec.attacks import AttackSpec, LossTerm
from medsec.cache import ArtifactStore
from medsec.data.base import Dataset


@dataclass(frozen=True)
class Family:
    """A family of study entries: its report section title (the table's order is the
    report's order)."""

    name: str
    title: str


# The one family table: report sections follow this order.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("none", "Undefended victim"),
        Family("robustification", "Robustification defences"),
        Family("detection", "Detection defences"),
        Family("integrity", "Signature gate (the remedy)"),
    )
}


@dataclass(frozen=True)
class BuildEnv:
    """What a defence may use while building: the study's budgets, seed, device, batch size
    and the artefact store (train once, reuse on every rerun)."""

    eps: tuple[float, ...]  # the study's budgets, [0,1] pixel units
    seed: int
    device: torch.device
    batch_size: int
    store: ArtifactStore


@dataclass(frozen=True)
class FitData:
    """What a detector's informed attacker may learn from (the detector's own fit data):
    reference images and labels, the clean fit images and their adversarial versions
    (``x_adv[i]`` is ``x_fit[i]`` attacked), and clean validation images."""

    x_ref: Tensor
    y_ref: Tensor
    x_fit: Tensor
    x_adv: Tensor | None
    x_val: Tensor
    seed: int
    device: torch.device


# (fitted detector, its fit data) -> (weighted loss terms, one-line description)
TermsFactory = Callable[[Any, FitData], tuple[list[tuple[float, LossTerm]], str]]


class Pipeline(nn.Module):
    """``classifier(preprocess(x))``: what is deployed, pixels in [0,1] -> logits."""

    def __init__(self, classifier: nn.Module, preprocess: nn.Module | None = None) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(x if self.preprocess is None else self.preprocess(x))


@dataclass
class Deployed:
    """A built defence as deployed, plus what the informed attacker differentiates.

    ``classifier`` (after ``preprocess``, if any) gives logits; ``pipeline`` is both, the
    thing every attack and every success decision sees. ``detector`` (detection family)
    follows the scikit-learn-style interface of :mod:`medsec.defences.detection.base`; a
    robustification defence may carry a reject option there (``flags(x) -> bool``, e.g.
    MedRDF's Robust Metric): a flagged image is refused, so never an attack success.
    Adaptive parts left at their defaults are found by the evaluator's probe (zero
    gradients through ``preprocess`` -> BPDA around it; randomness -> EOT and repeats).
    """

    classifier: nn.Module
    preprocess: nn.Module | None = None
    detector: Any = None
    paper_attacks: list[AttackSpec] = field(default_factory=list)
    transfer: bool = False  # paper attacks crafted on the undefended victim (defence unaware)
    attack_view: nn.Module | None = None  # differentiable stand-in for the pipeline
    eot: int = 1  # noise draws per attack step (randomised pipelines)
    repeats: int = 1  # evaluations of a randomised pipeline's success (majority decides)
    bpda: str = "none"  # what the attack view replaces on the backward pass, in words
    reseed: Callable[[int], None] | None = None  # makes the pipeline's randomness repeatable
    attack_terms: TermsFactory | None = None  # detection: the informed attacker's loss terms
    record: dict[str, Any] = field(default_factory=dict)  # training record ('artifact' keys)
    notes: list[str] = field(default_factory=list)  # facts of this build for the report
    diagnostics: Callable[[Tensor], dict[str, float]] | None = None  # extra per-image stats
    max_images: int | None = None  # cap on attacked images (cost of EOT x repeats)
    # certified defences: x -> (prediction, certified L2 radius); prediction -1 = abstain
    certify: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
    pipeline: nn.Module = field(init=False)

    def __post_init__(self) -> None:
        self.pipeline = (
            self.classifier
            if self.preprocess is None
            else Pipeline(self.classifier, self.preprocess).train(self.classifier.training)
        )


class Defence:
    """Base class of every defence (see the module docstring). Subclass, set the class
    attributes, implement ``build``, and decorate with :func:`register_defence`."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = "robustification"
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    assumptions: ClassVar[tuple[str, ...]] = ()
    working_eps: ClassVar[float | None] = None
    # an honest baseline (e.g. adversarial training): reported, not judged as "broken"
    reference: ClassVar[bool] = False

    def build(self, victim: nn.Module, data: Dataset, env: BuildEnv) -> Deployed:
        raise NotImplementedError

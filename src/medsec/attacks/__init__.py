"""One attack engine: the PGD loop, composable losses, EOT/BPDA, the gradient-free Square
Attack, and one success criterion."""

from medsec.attacks.criteria import Criterion, eval_mode, majority, success_runs
from medsec.attacks.losses import (
    LossTerm,
    Objective,
    as_two_logits,
    create_loss,
    cross_entropy,
    logits_forward,
    margin,
)
from medsec.attacks.pgd import (
    PRESETS,
    AttackResult,
    AttackSpec,
    default_objective,
    pgd,
    preset,
    run_attack,
)
from medsec.attacks.square import run_square, square
from medsec.attacks.transforms import BPDA, EOT

__all__ = [
    "BPDA",
    "EOT",
    "PRESETS",
    "AttackResult",
    "AttackSpec",
    "Criterion",
    "LossTerm",
    "Objective",
    "as_two_logits",
    "create_loss",
    "cross_entropy",
    "default_objective",
    "eval_mode",
    "logits_forward",
    "majority",
    "margin",
    "pgd",
    "preset",
    "run_attack",
    "run_square",
    "square",
    "success_runs",
]

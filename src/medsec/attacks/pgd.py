"""The one attack loop: projected gradient ascent (L-inf or L2) with random start and restarts.

FGSM and BIM are settings of this loop (1 step / no random start; n steps of eps/n), CW-L-inf
is this loop with the margin loss, and every adaptive attack is this loop with more loss
terms (see losses.py) or a wrapped objective (EOT) or pipeline (BPDA).

Per-example bookkeeping follows AutoAttack: an example that succeeds (as decided by the
:class:`~medsec.attacks.criteria.Criterion`, asked after every step; on a randomised
pipeline about each new best iterate) is frozen at that
iterate and leaves the batch; later restarts only work on the failures, and a failure
returns its best iterate. The step rule is plain PGD or APGD (medsec.attacks.steps). The
gradient is taken with respect to the input only (``torch.autograd.grad``), never the
weights; steps without a usable gradient are counted per example, never hidden.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from medsec.attacks.criteria import Criterion, eval_mode, loop_criterion
from medsec.attacks.losses import Objective, create_loss, logits_forward
from medsec.attacks.precision import PRECISIONS, fast_step, folded, layout, resolve
from medsec.attacks.steps import APGDStep, PGDStep, StepRule
from medsec.attacks.track import LATE, Track
from medsec.attacks.transforms import EOT
from medsec.errors import MedsecError

NORMS = ("linf", "l2")
STEP_RULES = ("pgd", "apgd")  # see medsec.attacks.steps
ObjectiveFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class AttackSpec:
    """Settings of one attack run; eps and step size are in [0,1] pixel units.

    ``step_size`` None means ``step_factor * eps / steps``. ``restart_step_factors``, if
    given, replaces ``step_factor`` per restart (cycled): small steps refine, large ones hop
    across a rugged or flat loss surface where small steps stall (measured on PGD-AT:
    50 steps at factor 2.5 -> 29% ASR at 4/255, at factor 50 -> 86%).
    """

    name: str
    eps: float
    norm: str = "linf"
    steps: int = 20
    step_factor: float = 2.5
    step_size: float | None = None
    random_start: bool = True
    restarts: int = 1
    loss: str = "ce"
    kappa: float = math.inf
    targeted: bool = False
    eot_samples: int = 1
    early_stop: bool = True
    restart_step_factors: tuple[float, ...] = ()
    step_rule: str = "pgd"
    precision: str = "auto"  # of each step's gradient: see medsec.attacks.precision

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise MedsecError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.norm not in NORMS:
            raise MedsecError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not (self.eps >= 0 and math.isfinite(self.eps)):
            raise MedsecError(f"eps must be a finite number >= 0, got {self.eps}")
        if self.step_rule not in STEP_RULES:
            raise MedsecError(f"step_rule must be one of {STEP_RULES}, got {self.step_rule!r}")
        if self.steps < 1 or self.restarts < 1 or self.eot_samples < 1:
            raise MedsecError("steps, restarts and eot_samples must all be >= 1")
        if any(not (f > 0 and math.isfinite(f)) for f in self.restart_step_factors):
            raise MedsecError(f"step factors must be finite and > 0: {self.restart_step_factors}")

    @property
    def alpha(self) -> float:
        """Step size of the first restart."""
        return self.alpha_for(0)

    def alpha_for(self, restart: int) -> float:
        """Step size of restart ``restart`` (0-based)."""
        if self.step_size is not None:
            return self.step_size
        factors = self.restart_step_factors or (self.step_factor,)
        return factors[restart % len(factors)] * self.eps / self.steps

    def unconstrained(self) -> AttackSpec:
        """This attack with its eps constraint removed (eps = 1: any image reachable), the
        check of Pintor et al. 2022: the same steps in pixel units, from the clean image.

        Steps that scale with eps would be 0.08 wide from a uniform-noise start at eps = 1,
        which every detector flags: measured (full profile), MGM 0.000 and deep features
        0.70 at eps = 1 against 1.000 at 4/255. That measures the start, not whether the
        objective can be optimised. APGD's step is relative to eps by design: not defined.
        """
        if self.step_rule != "pgd" or self.eps <= 0:
            raise MedsecError("an unconstrained run needs a bounded PGD attack to take steps from")
        return replace(
            self,
            eps=1.0,
            random_start=False,
            step_factor=self.step_factor * self.eps,
            restart_step_factors=tuple(f * self.eps for f in self.restart_step_factors),
        )

    def record(self) -> dict[str, Any]:
        """Everything needed to rerun it, for result files (inf written as a string)."""
        rec = asdict(self)
        rec["alpha"] = self.alpha
        rec["kappa"] = None if math.isinf(self.kappa) else self.kappa
        return rec


# The named attacks of the study; eps is filled in per run.
PRESETS: dict[str, AttackSpec] = {
    "fgsm": AttackSpec("fgsm", 0.0, steps=1, step_factor=1.0, random_start=False),
    "bim": AttackSpec("bim", 0.0, steps=20, step_factor=1.0, random_start=False),
    "pgd-20": AttackSpec("pgd-20", 0.0, steps=20),
    "pgd-100": AttackSpec("pgd-100", 0.0, steps=100),
    "cw-linf": AttackSpec("cw-linf", 0.0, steps=30, loss="margin"),
    "pgd-l2": AttackSpec("pgd-l2", 0.0, norm="l2", steps=50),
}


def preset(name: str, eps: float, **overrides: Any) -> AttackSpec:
    """A named attack (``fgsm``, ``bim``, ``pgd-20``, ``pgd-100``, ``cw-linf``, ``pgd-l2``)."""
    if name not in PRESETS:
        raise MedsecError(f"unknown attack {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], eps=eps, **overrides)


@dataclass
class AttackResult:
    """Adversarial images, per-example success (as the Criterion decided during the attack),
    and loop diagnostics.

    Per example (for the indicators of attack failure, Pintor et al. 2022):
    ``unavailable_grad`` = fraction of its steps whose input gradient was all zero or
    non-finite; ``late_gain`` = for a failure, the share of its last restart's objective gain
    made in the final ``LATE`` of the steps (near 1: still climbing when stopped; 0 for
    successes and for flat objectives).
    """

    x_adv: Tensor
    success: Tensor
    spec: AttackSpec
    loss_curve: list[float] = field(default_factory=list)  # mean objective per step, restart 0
    grad_norm_mean: float = 0.0  # first step of restart 0
    zero_grad_fraction: float = 0.0  # first step of restart 0
    nonfinite_grad_fraction: float = 0.0  # first step of restart 0
    seconds: float = 0.0
    unavailable_grad: Tensor | None = None
    late_gain: Tensor | None = None
    precision: str = "fp32"  # what the steps' gradients were computed in


def _random_start(x: Tensor, spec: AttackSpec, gen: torch.Generator | None) -> Tensor:
    if not spec.random_start or spec.eps == 0:
        return torch.zeros_like(x)
    if spec.norm == "linf":
        u = torch.rand(x.shape, generator=gen, device="cpu").to(x.device)
        return (2 * u - 1) * spec.eps
    d = torch.randn(x.shape, generator=gen, device="cpu").to(x.device)
    n = d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.ndim - 1))
    r = torch.rand(len(x), generator=gen, device="cpu").to(x.device).view_as(n)
    return d / n * r * spec.eps


def _rule(x0: Tensor, spec: AttackSpec, restart: int) -> StepRule:
    if spec.step_rule == "apgd":
        return APGDStep(x0, spec.eps, spec.norm, spec.steps)
    return PGDStep(x0, spec.eps, spec.norm, spec.alpha_for(restart))


def _input_grad(value: Tensor, xa: Tensor) -> Tensor:
    """d value.sum() / d xa; zeros where the graph does not reach the input (a
    non-differentiable step cut it): counted as zero gradients, never an exception."""
    if not value.requires_grad:
        return torch.zeros_like(xa)
    (grad,) = torch.autograd.grad(value.sum(), xa, allow_unused=True)
    return torch.zeros_like(xa) if grad is None else grad


def _settle(
    ok: Tensor, xa: Tensor, idx: Tensor, out: Tensor, done: Tensor
) -> tuple[Tensor, Tensor]:
    """Freeze the rows ``ok`` (successes) at ``xa`` in ``out``/``done``; the rows left
    running and the mask that keeps them."""
    out[idx[ok]] = xa[ok]
    done[idx[ok]] = True
    keep = ~ok
    return xa[keep], keep


def pgd(
    objective: ObjectiveFn,
    x: Tensor,
    criterion: Criterion,
    spec: AttackSpec,
    *,
    generator: torch.Generator | None = None,
) -> AttackResult:
    """Run the loop on one batch; ``criterion`` decides success (and early stops).

    With ``early_stop`` the criterion is asked after every step, so a success found along
    the path is always the one returned (no silent success); a failure returns its best
    (highest-objective) iterate over all restarts, not its last. On a randomised pipeline
    (``criterion.repeats`` > 1, many fresh calls per question) it is asked, before each
    step, about the iterates that are their restart's best so far by the attacker's own
    objective: every iterate the loop could return is judged, and the calls on points the
    attacker itself ranks worse are saved (measured on MedRDF: the criterion was 2/3 of the
    attack's time when asked after every step)."""
    start = time.perf_counter()
    n = len(x)
    all_idx = torch.arange(n, device=x.device)
    out = x.clone()
    done = torch.zeros(n, dtype=torch.bool, device=x.device)
    curve: list[float] = []
    track = Track(x)
    if spec.eps == 0:  # nothing to optimise: the clean image is the only candidate
        done = criterion(x, all_idx)
        return AttackResult(out, done, spec, seconds=time.perf_counter() - start)
    late_from = min(spec.steps - 1, max(1, round((1 - LATE) * spec.steps)))
    fast = resolve(spec.precision, x.device)
    gated = spec.early_stop and criterion.repeats > 1
    for restart in range(spec.restarts):
        idx = all_idx[~done]
        if len(idx) == 0:
            break
        x0 = x[idx]
        xa = (x0 + _random_start(x0, spec, generator)).clamp_(0, 1)
        rule = _rule(x0, spec, restart)
        marks: dict[str, Tensor] = {}  # objective at step 0, at the late mark, running best
        for t in range(spec.steps):
            xa = layout(xa, fast).requires_grad_(True)
            with fast_step(fast, x.device):
                value = objective(xa, idx)
            grad = track.see(idx, xa, value, _input_grad(value, xa))
            v = value.detach().float()
            record = v > marks["best"] if "best" in marks else torch.ones_like(v, dtype=torch.bool)
            if t == late_from and t > 0:  # the best before the late steps
                marks["late"] = marks["best"].clone()
            marks["best"] = torch.maximum(marks["best"], v) if "best" in marks else v.clone()
            if t == 0:
                marks["first"] = v.clone()
            if restart == 0:
                curve.append(float(v.mean()))
            last = t == spec.steps - 1
            with torch.no_grad():
                xa = xa.detach()
                if gated:  # judge the restart's new best iterates, then step from the rest
                    ok = torch.zeros_like(record)
                    if bool(record.any()):
                        ok[record] = criterion(xa[record].contiguous(), idx[record])
                    xa, keep = _settle(ok, xa, idx, out, done)
                    idx, grad, v = idx[keep], grad[keep], v[keep]
                    marks = {k: m[keep] for k, m in marks.items()}
                    rule.keep(keep)
                    if last and "late" in marks:  # every row left failed
                        track.late(idx, *(marks[k] for k in ("first", "late", "best")))
                    if len(idx) == 0 or last:
                        break
                    xa = rule.step(xa, grad, v, t)
                    continue
                xa = rule.step(xa, grad, v, t)
                if not (last or spec.early_stop):
                    continue
                ok = criterion(xa.contiguous(), idx)  # judged in fp32, laid out as stored
                if last and "late" in marks:
                    keep = ~ok
                    track.late(idx[keep], *(marks[k][keep] for k in ("first", "late", "best")))
                xa, keep = _settle(ok, xa, idx, out, done)
                idx = idx[keep]
                marks = {k: m[keep] for k, m in marks.items()}
                rule.keep(keep)
                if len(idx) == 0:
                    break
    failed = ~done
    out[failed] = track.best_x[failed]
    first = track.first or {"norm": 0.0, "zero": 0.0, "nonfinite": 0.0}
    return AttackResult(
        out,
        done,
        spec,
        curve,
        grad_norm_mean=first["norm"],
        zero_grad_fraction=first["zero"],
        nonfinite_grad_fraction=first["nonfinite"],
        seconds=time.perf_counter() - start,
        unavailable_grad=(track.bad / track.steps.clamp_min(1)).cpu(),
        late_gain=track.late_gain.cpu(),
        precision=fast,
    )


def default_objective(pipeline: nn.Module, spec: AttackSpec, labels: Tensor) -> ObjectiveFn:
    """The spec's loss on the pipeline's logits, with EOT when ``spec.eot_samples`` > 1."""
    kwargs = {"kappa": spec.kappa} if spec.loss == "margin" else {}
    obj: ObjectiveFn = Objective(
        logits_forward(pipeline), [(1.0, create_loss(spec.loss, **kwargs))], labels, spec.targeted
    )
    return EOT(obj, spec.eot_samples) if spec.eot_samples > 1 else obj


def run_attack(
    pipeline: nn.Module,
    x: Tensor,
    y: Tensor,
    spec: AttackSpec,
    *,
    targets: Tensor | None = None,
    detector: Any = None,
    objective_factory: Callable[[Tensor, Tensor], ObjectiveFn] | None = None,
    batch_size: int = 250,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    repeats: int = 1,
) -> AttackResult:
    """Attack ``x`` (true labels ``y``) in batches; success re-predicted by one Criterion.

    ``objective_factory(labels_or_targets, batch_indices)`` builds a custom (adaptive)
    objective per batch; by default the spec's loss on the pipeline's logits. ``repeats``:
    > 1 marks a randomised pipeline: see :func:`~medsec.attacks.criteria.loop_criterion`.
    """
    if spec.targeted and targets is None:
        raise MedsecError("a targeted attack needs target labels")
    device = next(iter(pipeline.parameters()), torch.empty(0)).device
    gen = torch.Generator().manual_seed(seed)
    outs: list[AttackResult] = []
    with eval_mode(pipeline):
        steps_on = pipeline  # what the default objective's gradients are taken through
        if objective_factory is None and resolve(spec.precision, device) == "bf16":
            steps_on = folded(pipeline)
        for s in range(0, len(x), batch_size):
            xb = x[s : s + batch_size].to(device)
            yb = y[s : s + batch_size].to(device)
            tb = targets[s : s + batch_size].to(device) if targets is not None else None
            crit = loop_criterion(pipeline, yb, tb, detector, repeats)
            aim = tb if spec.targeted else yb
            obj = (
                objective_factory(aim, torch.arange(s, s + len(xb)))
                if objective_factory
                else default_objective(steps_on, spec, aim)
            )
            outs.append(pgd(obj, xb, crit, spec, generator=gen))
            if progress is not None:
                progress(len(xb))
    if not outs:
        raise MedsecError("nothing to attack: empty input")
    weights = [len(o.x_adv) for o in outs]
    total = sum(weights)

    def wmean(attr: str) -> float:
        return sum(getattr(o, attr) * w for o, w in zip(outs, weights, strict=True)) / total

    curves = [o.loss_curve for o in outs if o.loss_curve]
    curve = (
        [sum(c[i] for c in curves) / len(curves) for i in range(min(map(len, curves)))]
        if curves
        else []
    )
    return AttackResult(
        torch.cat([o.x_adv.cpu() for o in outs]),
        torch.cat([o.success.cpu() for o in outs]),
        spec,
        curve,
        wmean("grad_norm_mean"),
        wmean("zero_grad_fraction"),
        wmean("nonfinite_grad_fraction"),
        sum(o.seconds for o in outs),
        _cat([o.unavailable_grad for o in outs]),
        _cat([o.late_gain for o in outs]),
        outs[0].precision,
    )


def _cat(parts: list[Tensor | None]) -> Tensor | None:
    return None if any(p is None for p in parts) else torch.cat(parts)  # type: ignore[arg-type]

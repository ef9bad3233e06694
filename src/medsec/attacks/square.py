"""Square Attack (Andriushchenko et al. 2020, L-inf): gradient-free random search.

The evidence that a white-box attack did not fail for a trivial reason (masked, zero or
non-finite gradients): Square needs only objective values. It starts from vertical stripes
of +-eps, then each query changes one random square (side from a schedule that shrinks over
the budget) by +-2 eps per channel, projects onto the eps-ball and [0, 1], and keeps the
candidate if the objective (the same :data:`~medsec.attacks.pgd.ObjectiveFn` PGD maximises)
increases. Success is decided only by the :class:`~medsec.attacks.criteria.Criterion`,
checked on every accepted candidate; a success freezes its example, a failure returns its
best (highest-objective) iterate. Written here, not taken from a library: the project's
Objective and Criterion must drive it (torchattacks/ART decide success by their own argmax).

Query = one objective evaluation of one example (the init counts as one); ``queries`` caps
it per example. The Criterion's re-predictions are the judge's, not the attacker's queries.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from medsec.attacks.criteria import Criterion, Flagger, eval_mode
from medsec.attacks.losses import Objective, logits_forward, margin
from medsec.attacks.pgd import AttackResult, AttackSpec, ObjectiveFn
from medsec.errors import MedsecError

# Iterations (of a 10000-query budget) after which p is halved; rescaled to the budget.
_HALVE_AT = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_RESAMPLES = 10  # redraws of a square's signs that would leave the image unchanged


def p_schedule(p_init: float, it: int, queries: int) -> float:
    """Fraction of pixels the square covers at iteration ``it`` (the paper's schedule)."""
    t = int(it / queries * 10000)
    return p_init / 2 ** bisect.bisect_left(_HALVE_AT, t)


def square_side(p: float, height: int, width: int) -> int:
    """Side of a square covering about ``p`` of the pixels, within 1 .. min side - 1."""
    s = round(math.sqrt(p * height * width))
    return max(1, min(s, min(height, width) - 1))


def _signs(shape: tuple[int, ...], gen: torch.Generator | None, like: Tensor) -> Tensor:
    """Uniform +-1 drawn on the CPU generator (device-independent), moved to ``like``."""
    bits = torch.randint(0, 2, shape, generator=gen, device="cpu")
    return (2 * bits - 1).to(device=like.device, dtype=like.dtype)


def _square_mask(
    b: int, h: int, w: int, s: int, gen: torch.Generator | None, like: Tensor
) -> Tensor:
    """(b, 1, h, w) bool: one s x s square per example at a uniformly random position."""
    top = torch.randint(0, h - s + 1, (b, 1), generator=gen, device="cpu").to(like.device)
    left = torch.randint(0, w - s + 1, (b, 1), generator=gen, device="cpu").to(like.device)
    rows, cols = torch.arange(h, device=like.device), torch.arange(w, device=like.device)
    in_rows = (rows >= top) & (rows < top + s)
    in_cols = (cols >= left) & (cols < left + s)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def _candidate(
    best: Tensor, lo: Tensor, hi: Tensor, eps: float, s: int, gen: torch.Generator | None
) -> Tensor:
    """``best`` + one square of +-2 eps per channel, projected onto the box ``[lo, hi]``
    (the eps-ball intersected with [0, 1]); signs that change nothing are redrawn."""
    b, c, h, w = best.shape
    mask = _square_mask(b, h, w, s, gen, best)
    sign = _signs((b, c, 1, 1), gen, best)
    for _ in range(_RESAMPLES):
        cand = torch.where(mask, best + 2 * eps * sign, best).clamp_(lo, hi)
        redraw = (cand == best).flatten(1).all(1)
        if not redraw.any():
            break
        fresh = _signs((b, c, 1, 1), gen, best)
        sign = torch.where(redraw[:, None, None, None], fresh, sign)
    return cand


def _values(objective: ObjectiveFn, x: Tensor, idx: Tensor) -> Tensor:
    """Objective without a graph; NaN counts as -inf so it is never accepted as better."""
    with torch.no_grad():
        return torch.nan_to_num(objective(x, idx).detach(), nan=-math.inf)


def square(
    objective: ObjectiveFn,
    x: Tensor,
    criterion: Criterion,
    eps: float,
    queries: int,
    *,
    p_init: float = 0.8,
    generator: torch.Generator | None = None,
) -> AttackResult:
    """L-inf Square Attack on one NCHW batch in [0, 1]; ``criterion`` decides success."""
    if queries < 1:
        raise MedsecError(f"the query budget must be >= 1, got {queries}")
    spec = AttackSpec(
        name="square", eps=eps, steps=queries, random_start=False, restarts=1, loss="margin"
    )
    if not 0 < p_init <= 1:
        raise MedsecError(f"p_init must be in (0, 1], got {p_init}")
    if x.ndim != 4:
        raise MedsecError(f"square attack needs NCHW images, got shape {tuple(x.shape)}")
    start = time.perf_counter()
    n, c, h, w = x.shape
    all_idx = torch.arange(n, device=x.device)
    if eps == 0:  # nothing to search: the clean image is the only candidate
        done = criterion(x, all_idx)
        return AttackResult(x.clone(), done, spec, seconds=time.perf_counter() - start)
    lo, hi = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    best = (x + eps * _signs((n, c, 1, w), generator, x)).clamp_(lo, hi)  # vertical stripes
    value = _values(objective, best, all_idx)
    done = criterion(best, all_idx)
    curve = [float(value.mean())]
    for it in range(1, queries):
        active = all_idx[~done]
        if len(active) == 0:
            break
        s = square_side(p_schedule(p_init, it, queries), h, w)
        cand = _candidate(best[active], lo[active], hi[active], eps, s, generator)
        new = _values(objective, cand, active)
        better = new > value[active]
        accepted = active[better]
        best[accepted] = cand[better]
        value[accepted] = new[better]
        curve.append(float(value[active].mean()))
        if len(accepted):
            done[accepted[criterion(cand[better], accepted)]] = True
    return AttackResult(best, done, spec, curve, seconds=time.perf_counter() - start)


def run_square(
    pipeline: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    queries: int,
    *,
    detector: Flagger | None = None,
    objective_factory: Callable[[Tensor, Tensor], ObjectiveFn] | None = None,
    batch_size: int = 250,
    seed: int = 0,
) -> AttackResult:
    """Untargeted Square Attack on ``x`` (true labels ``y``) in batches, like ``run_attack``:
    one Criterion per batch (with ``detector``), the margin loss on the pipeline's logits
    unless ``objective_factory(labels, batch_indices)`` is given; deterministic per seed."""
    device = next(iter(pipeline.parameters()), torch.empty(0)).device
    gen = torch.Generator().manual_seed(seed)
    outs: list[AttackResult] = []
    with eval_mode(pipeline):
        for s in range(0, len(x), batch_size):
            xb = x[s : s + batch_size].to(device)
            yb = y[s : s + batch_size].to(device)
            crit = Criterion(pipeline, yb, detector=detector)
            obj = (
                objective_factory(yb, torch.arange(s, s + len(xb)))
                if objective_factory
                else Objective(logits_forward(pipeline), [(1.0, margin())], yb)
            )
            outs.append(square(obj, xb, crit, eps, queries, generator=gen))
    if not outs:
        raise MedsecError("nothing to attack: empty input")
    curves = [o.loss_curve for o in outs]
    # Per query, the mean over the batches still searching at that query.
    curve = [
        sum(c[i] for c in curves if len(c) > i) / sum(len(c) > i for c in curves)
        for i in range(max(map(len, curves)))
    ]
    return AttackResult(
        torch.cat([o.x_adv.cpu() for o in outs]),
        torch.cat([o.success.cpu() for o in outs]),
        outs[0].spec,
        curve,
        seconds=sum(o.seconds for o in outs),
    )

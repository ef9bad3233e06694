"""Indicators of attack failure (Pintor et al. 2022, "Indicators of Attack Failure:
Debugging and Improving Optimization of Adversarial Examples", NeurIPS) for any attack run
against any deployed pipeline.

Each indicator says whether a low attack success rate could be the attack's fault rather
than the defence's merit, with the value measured. All are fractions of the attacked images,
judged against ``TOLERANCE`` (the +-0.05 the headline intervals allow), except the
unconstrained attack, which must reach ``UNBOUNDED_ASR``:

- silent success: the loop's Criterion saw a success that the deployed pipeline's final
  re-evaluation (majority of repeated runs) does not confirm;
- incomplete optimisation: failures whose objective was still climbing at the end (more
  than ``LATE_SHARE`` of the last restart's gain made in its final 20% of steps);
- transfer failure: images that succeed on the attacker's view (BPDA / surrogate / EOT
  average) but fail on the deployed pipeline (not applicable when they are the same);
- unavailable gradients: images whose input gradient was zero or non-finite on at least
  ``BAD_STEPS`` of their steps;
- unstable predictions: images whose objective under repeated calls and input noise (1/8
  of the attack's eps) varies by more than ``NOISE_SPREAD`` of the distance the attack had
  to cover (the clean margin's distance to the boundary, or what it moved, if more); a
  randomised pipeline attacked with EOT and majority re-evaluation counts as mitigated;
- unconstrained attack failure: the same attack with eps = 1 (any image reachable) must
  reach ~100%, detectors included.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from medsec.attacks import eval_mode
from medsec.attacks.criteria import majority
from medsec.attacks.losses import as_two_logits
from medsec.attacks.pgd import AttackResult
from medsec.defences.base import Deployed
from medsec.evaluation.context import StudyContext

TOLERANCE = 0.05
LATE_SHARE = 0.25
BAD_STEPS = 0.10
NOISE_SPREAD = 0.10
# Input noise (uniform +-) for the objective's spread, as a share of the attack's eps: the
# spread of a smooth objective under noise, relative to what the attack moved it, scales as
# noise / eps, so a fixed noise (0.5/255 before) is stricter the smaller the budget (blob
# victim at 0.5/255: 0.076 fired, 0.000 now).
NOISE_SHARE = 1 / 8
NOISE_DRAWS = 4
UNBOUNDED_ASR = 0.99
# in the key of every cell that stores indicators: a changed rule recomputes them
SETTINGS = {
    "tolerance": TOLERANCE,
    "late_share": LATE_SHARE,
    "bad_steps": BAD_STEPS,
    "noise_spread": NOISE_SPREAD,
    "noise_share_of_eps": NOISE_SHARE,
    "noise_draws": NOISE_DRAWS,
    "spread_scale": "max(|margin moved|, |clean margin|)",
}

NAMES = (
    "silent success",
    "incomplete optimisation",
    "transfer failure",
    "unavailable gradients",
    "unstable predictions",
    "unconstrained attack failure",
)


@dataclass(frozen=True)
class Indicator:
    """One indicator for one attack run: ``passed`` None = not applicable."""

    name: str
    passed: bool | None
    measured: float | None
    expected: str
    detail: str

    def record(self) -> dict[str, Any]:
        return asdict(self)


def _frac(mask: Tensor) -> float:
    """Share of True entries, exact in double: a float32 mean made 2 of 40 read
    0.0500000007 and fail "<= 0.05" (measured: smoothing's silent-success indicator)."""
    return int(mask.sum()) / mask.numel() if mask.numel() else 0.0


def silent_success(loop_success: Tensor, final_success: Tensor) -> Indicator:
    silent = loop_success.bool() & ~final_success.bool()
    v = _frac(silent)
    return Indicator(
        "silent success",
        v <= TOLERANCE,
        v,
        f"<= {TOLERANCE}",
        f"{int(silent.sum())} of {len(silent)} images succeeded in the loop but not on the "
        "deployed pipeline's final re-evaluation",
    )


def incomplete(late_gain: Tensor | None, final_success: Tensor) -> Indicator:
    if late_gain is None:
        return Indicator("incomplete optimisation", None, None, "-", "no per-example trace")
    climbing = (late_gain > LATE_SHARE) & ~final_success.bool()
    v = _frac(climbing)
    return Indicator(
        "incomplete optimisation",
        v <= TOLERANCE,
        v,
        f"<= {TOLERANCE}",
        f"{int(climbing.sum())} failures made > {LATE_SHARE:.0%} of their objective gain in "
        "the last 20% of the steps (still climbing: more steps could succeed)",
    )


def transfer_failure(view_success: Tensor | None, final_success: Tensor) -> Indicator:
    if view_success is None:
        return Indicator(
            "transfer failure",
            None,
            None,
            "-",
            "not applicable: the attack ran on the deployed pipeline itself",
        )
    lost = view_success.bool() & ~final_success.bool()
    v = _frac(lost)
    return Indicator(
        "transfer failure",
        v <= TOLERANCE,
        v,
        f"<= {TOLERANCE}",
        f"{int(lost.sum())} images fool the attacker's view but not the deployed pipeline "
        f"(view ASR {_frac(view_success.bool()):.3f}, deployed {_frac(final_success):.3f})",
    )


def unavailable(unavailable_grad: Tensor | None) -> Indicator:
    if unavailable_grad is None:
        return Indicator("unavailable gradients", None, None, "-", "no per-example trace")
    bad = unavailable_grad >= BAD_STEPS
    v = _frac(bad)
    return Indicator(
        "unavailable gradients",
        v <= TOLERANCE,
        v,
        f"<= {TOLERANCE}",
        f"{int(bad.sum())} images had a zero or non-finite input gradient on >= "
        f"{BAD_STEPS:.0%} of their steps (mean share of such steps "
        f"{float(unavailable_grad.mean()) if len(unavailable_grad) else 0.0:.3f})",
    )


def unstable(spread: Tensor, mitigated: bool) -> Indicator:
    shaky = spread > NOISE_SPREAD
    v = _frac(shaky)
    ok = v <= TOLERANCE
    return Indicator(
        "unstable predictions",
        ok or mitigated,
        v,
        f"<= {TOLERANCE} (or EOT + majority re-evaluation)",
        f"{int(shaky.sum())} images: the objective under repeated calls and uniform noise of "
        f"+-{NOISE_SHARE:g} eps spreads by > {NOISE_SPREAD:.0%} of the distance the attack "
        "had to cover"
        + ("" if ok else "; mitigated by EOT and majority re-evaluation" if mitigated else ""),
    )


def unconstrained(asr: float, n: int) -> Indicator:
    return Indicator(
        "unconstrained attack failure",
        asr >= UNBOUNDED_ASR,
        asr,
        f">= {UNBOUNDED_ASR}",
        f"the same attack at eps = 1 (any image reachable; its steps in pixel units, from the "
        f"clean image) on {n} images: ASR {asr:.3f}",
    )


@torch.no_grad()
def margin_of(pipeline: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Untargeted margin max_{j != y} z_j - z_y of the deployed pipeline (> 0: fooled)."""
    with eval_mode(pipeline):
        z = as_two_logits(pipeline(x))
    own = z.gather(1, y[:, None])[:, 0]
    other = z.masked_fill(nn.functional.one_hot(y, z.shape[1]).bool(), -torch.inf).amax(1)
    return other - own


@torch.no_grad()
def objective_spread(
    pipeline: nn.Module,
    x: Tensor,
    x_adv: Tensor,
    y: Tensor,
    eps: float,
    *,
    seed: int = 0,
    batch_size: int = 250,
) -> Tensor:
    """Per image: spread (max - min) of the margin at ``x_adv`` over repeated calls with
    input noise of ``NOISE_SHARE`` of the attack's ``eps``, relative to the distance the
    attack had to cover: the clean margin's distance to the boundary, or how far the attack
    moved the margin if further. (Relative to the move alone, a failure returned as the clean
    image moved nothing and divided by ~0: the full-profile detectors' 0.20-0.24 "unstable"
    at 1/255 were exactly their failed images, each with a spread of ~0.)"""
    noise = NOISE_SHARE * eps
    gen = torch.Generator().manual_seed(seed)
    device = next(iter(pipeline.parameters()), torch.empty(0)).device
    out = []
    for s in range(0, len(x), batch_size):
        xb, ab, yb = (t[s : s + batch_size].to(device) for t in (x, x_adv, y))
        draws = []
        for _ in range(NOISE_DRAWS):
            u = torch.rand(ab.shape, generator=gen).to(device)
            draws.append(margin_of(pipeline, (ab + (2 * u - 1) * noise).clamp(0, 1), yb))
        m = torch.stack(draws)
        clean = margin_of(pipeline, xb, yb)
        covered = torch.maximum((margin_of(pipeline, ab, yb) - clean).abs(), clean.abs())
        out.append(((m.amax(0) - m.amin(0)) / covered.clamp_min(1e-6)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def view_success(
    view: nn.Module,
    x_adv: Tensor,
    y: Tensor,
    *,
    draws: int = 1,
    batch_size: int = 250,
    detector: Any = None,
) -> Tensor:
    """Success on the attacker's view: the Criterion on the view's prediction (averaged
    softmax over ``draws`` calls where the view is randomised), not flagged by the
    pipeline's ``detector`` (reject option), if any."""
    out = []
    device = next(iter(view.parameters()), torch.empty(0)).device
    with eval_mode(view):
        for s in range(0, len(x_adv), batch_size):
            xb, yb = x_adv[s : s + batch_size].to(device), y[s : s + batch_size].to(device)
            p = torch.stack(
                [as_two_logits(view(xb)).softmax(1) for _ in range(max(1, draws))]
            ).mean(0)
            ok = p.argmax(1) != yb
            if detector is not None:
                ok = ok & ~detector.flags(xb).to(ok.device)
            out.append(ok.cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def passed_all(found: list[Indicator]) -> bool:
    """Every applicable indicator passes."""
    return all(i.passed is not False for i in found)


def add_checks(
    ctx: StudyContext, defence: str, by_eps: dict[float, list[dict[str, Any]]], prefix: str = ""
) -> None:
    """One validity check per indicator over every eps of a defence's adaptive attack: it
    passes where it passes at every eps; an indicator applicable nowhere gets no check."""
    by_name: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for eps in sorted(by_eps):
        for found in by_eps[eps]:
            by_name.setdefault(found["name"], []).append((eps, found))
    for name, found in by_name.items():
        applicable = [(e, i) for e, i in found if i["passed"] is not None]
        if not applicable:
            continue
        bad = [(e, i) for e, i in applicable if not i["passed"]]
        e, worst = (bad or applicable)[0]
        ctx.add_check(
            f"{prefix}indicator: {name}",
            not bad,
            f"at {e * 255:g}/255: {worst['detail']}",
            kind="validity",
            defence=defence,
            measured={f"{e * 255:g}": i["measured"] for e, i in applicable},
            expected=worst["expected"],
        )


def of_run(
    ctx: StudyContext, dep: Deployed, x: Tensor, y: Tensor, res: AttackResult, succ: Tensor
) -> list[dict[str, Any]]:
    """The indicators of attack failure of one adaptive run (the unconstrained one is run
    separately, in the diagnostics)."""
    final = majority(succ)
    bs = ctx.profile.batch_size
    view = None
    if dep.attack_view is not None or dep.eot > 1:
        seen = dep.attack_view if dep.attack_view is not None else dep.pipeline
        view = view_success(seen, res.x_adv, y, draws=dep.eot, batch_size=bs, detector=dep.detector)
    if dep.reseed is not None:
        dep.reseed(ctx.seed)
    eps = res.spec.eps
    spread = objective_spread(dep.pipeline, x, res.x_adv, y, eps, seed=ctx.seed, batch_size=bs)
    found = [
        silent_success(res.success, final),
        incomplete(res.late_gain, final),
        transfer_failure(view, final),
        unavailable(res.unavailable_grad),
        unstable(spread, mitigated=dep.eot > 1 and dep.repeats > 1),
    ]
    return [i.record() for i in found]

"""The attack loop's bookkeeping (best iterate, per-step gradient accounting, APGD) and the
indicators of attack failure: each fires on a fixture built to trigger it and stays quiet
on the undefended victim."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import Tensor, nn

from medsec.attacks import AttackSpec, Criterion, Objective, logits_forward, margin, run_attack
from medsec.attacks.steps import checkpoints
from medsec.errors import MedsecError
from medsec.evaluation import indicators as ind
from medsec.evaluation.context import clopper_pearson
from medsec.evaluation.diagnostics import gradient_killed


def _xy(blob_data, n=60) -> tuple[Tensor, Tensor]:
    x = torch.from_numpy(blob_data.test.images[:n])
    y = torch.from_numpy(blob_data.test.labels[:n])
    return x, y


def _correct(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    ok = Criterion(model, y).predict(x) == y
    return x[ok], y[ok]


class Noisy(nn.Module):
    """A randomised pipeline: strong input noise at every call."""

    def __init__(self, victim: nn.Module, sigma: float) -> None:
        super().__init__()
        self.victim, self.sigma = victim, sigma

    def forward(self, x: Tensor) -> Tensor:
        return self.victim(x + self.sigma * torch.randn_like(x))


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, math.nan)


class NaNGradient(nn.Module):
    """Identity forward, NaN backward: every step's gradient is unusable."""

    def __init__(self, victim: nn.Module) -> None:
        super().__init__()
        self.victim = victim

    def forward(self, x: Tensor) -> Tensor:
        return self.victim(_NaNGrad.apply(x))


def _margin_attack(model, x, y, eps, **kw):
    spec = AttackSpec("m", eps, loss="margin", **kw)
    return run_attack(model, x, y, spec, seed=0)


def test_apgd_checkpoints_follow_the_paper():
    assert sorted(checkpoints(100)) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_apgd_stays_in_the_ball_and_is_as_strong_as_pgd(trained, blob_data):
    victim, _ = trained
    x, y = _correct(victim, *_xy(blob_data, 80))
    eps = 2 / 255
    pgd = _margin_attack(victim, x, y, eps, steps=20)
    apgd = _margin_attack(victim, x, y, eps, steps=20, step_rule="apgd")
    assert (apgd.x_adv - x).abs().max() <= eps + 1e-6
    assert apgd.x_adv.min() >= 0 and apgd.x_adv.max() <= 1
    assert torch.equal(apgd.success, Criterion(victim, y)(apgd.x_adv))
    assert apgd.success.float().mean() >= pgd.success.float().mean() - 0.05
    assert apgd.spec.record()["step_rule"] == "apgd"


def test_failures_return_their_best_iterate_not_their_last(trained, blob_data):
    """Huge steps make the objective oscillate; a failure must come back at its best."""
    victim, _ = trained
    x, y = _correct(victim, *_xy(blob_data))
    spec = AttackSpec("m", 1 / 255, steps=10, loss="margin", step_factor=50.0)

    class Never:  # flags every image: nothing ever succeeds, every example is a failure
        def flags(self, xs: Tensor) -> Tensor:
            return torch.ones(len(xs), dtype=torch.bool)

    obj = Objective(logits_forward(victim), [(1.0, margin())], y)
    # fp32 steps: the loop's objective is the fp32 objective, so "best" is exact.
    res = run_attack(victim, x, y, replace(spec, precision="fp32"), detector=Never(), seed=0)
    with torch.no_grad():
        final = obj(res.x_adv, torch.arange(len(x)))
    assert not res.success.any()
    assert float(final.mean()) >= max(res.loss_curve) - 1e-5
    # bf16 steps rank iterates by a bf16 objective: best up to bf16's 2^-8 relative rounding.
    res = run_attack(victim, x, y, replace(spec, precision="bf16"), detector=Never(), seed=0)
    with torch.no_grad():
        final = obj(res.x_adv, torch.arange(len(x)))
    best = max(res.loss_curve)
    assert not res.success.any()
    assert float(final.mean()) >= best - 2**-8 * abs(best)


def test_unavailable_gradients_counted_at_every_step(trained, blob_data):
    victim, _ = trained
    x, y = _correct(victim, *_xy(blob_data))
    clean = _margin_attack(victim, x, y, 1 / 255, steps=10)
    assert ind.unavailable(clean.unavailable_grad).passed
    for broken in (gradient_killed(victim), NaNGradient(victim).train(victim.training)):
        res = _margin_attack(broken, x, y, 1 / 255, steps=10)
        assert res.unavailable_grad is not None and bool((res.unavailable_grad == 1).all())
        found = ind.unavailable(res.unavailable_grad)
        assert found.passed is False and found.measured == 1.0


def test_incomplete_optimisation_fires_on_an_attack_stopped_early(trained, blob_data):
    victim, _ = trained
    x, y = _correct(victim, *_xy(blob_data))
    eps = 8 / 255
    stopped = _margin_attack(victim, x, y, eps, steps=2, step_size=eps / 100)
    final = Criterion(victim, y)(stopped.x_adv)
    assert ind.incomplete(stopped.late_gain, final).passed is False
    full = _margin_attack(victim, x, y, eps, steps=20, restarts=2)
    assert ind.incomplete(full.late_gain, Criterion(victim, y)(full.x_adv)).passed


def test_silent_success_and_instability_fire_on_a_random_pipeline(trained, blob_data):
    victim, _ = trained
    x, y = _correct(victim, *_xy(blob_data, 120))
    was = victim.training
    noisy = Noisy(victim, 0.3).train(was)  # wrappers take the victim's mode
    torch.manual_seed(0)
    res = _margin_attack(noisy, x, y, 1 / 255, steps=10)  # single draws decide in the loop
    runs = torch.stack([Criterion(noisy, y)(res.x_adv) for _ in range(9)])
    final = runs.float().mean(0) >= 0.5
    silent = ind.silent_success(res.success, final)
    assert silent.passed is False
    # the loop deciding by the same majority rule as the final re-evaluation: far quieter
    voted = run_attack(noisy, x, y, AttackSpec("m", 1 / 255, steps=10, loss="margin"), repeats=9)
    again = torch.stack([Criterion(noisy, y)(voted.x_adv) for _ in range(9)]).float().mean(0)
    assert ind.silent_success(voted.success, again >= 0.5).measured < silent.measured / 2
    spread = ind.objective_spread(noisy, x, res.x_adv, y, 1 / 255, seed=0)
    assert ind.unstable(spread, mitigated=False).passed is False
    assert ind.unstable(spread, mitigated=True).passed  # EOT + majority: handled
    # the deterministic victim: quiet on both
    plain = _margin_attack(victim, x, y, 4 / 255, steps=20)
    assert ind.silent_success(plain.success, Criterion(victim, y)(plain.x_adv)).passed
    assert ind.unstable(
        ind.objective_spread(victim, x, plain.x_adv, y, 4 / 255), mitigated=False
    ).passed
    # failures returned as the clean image (the detection attacker's rule) moved nothing:
    # still stable, judged against the clean margin's distance to the boundary
    assert ind.unstable(ind.objective_spread(victim, x, x, y, 1 / 255), mitigated=False).passed
    assert victim.training == was  # the wrappers left the shared victim as they found it


def test_transfer_failure_fires_on_a_surrogate_that_disagrees(trained, blob_data):
    victim, _ = trained
    x, y = _correct(victim, *_xy(blob_data))
    torch.manual_seed(1)
    surrogate = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 2))  # untrained, unrelated
    obj = lambda labels, idx: Objective(logits_forward(surrogate), [(1.0, margin())], labels)  # noqa: E731
    spec = AttackSpec("surrogate", 4 / 255, steps=20, loss="margin", early_stop=False)
    res = run_attack(victim, x, y, spec, objective_factory=obj, seed=0)
    seen = ind.view_success(surrogate, res.x_adv, y)
    final = Criterion(victim, y)(res.x_adv)
    assert seen.float().mean() > 0.5
    assert ind.transfer_failure(seen, final).passed is False
    same = ind.view_success(victim, res.x_adv, y)
    assert ind.transfer_failure(same, final).passed
    assert ind.transfer_failure(None, final).passed is None  # no view: not applicable


def test_unconstrained_attack_fails_only_where_the_attack_is_broken(trained, blob_data):
    victim, _ = trained
    x, y = _correct(victim, *_xy(blob_data, 40))
    ok = _margin_attack(victim, x, y, 1.0, steps=20)
    assert ind.unconstrained(float(ok.success.float().mean()), len(x)).passed
    masked = _margin_attack(gradient_killed(victim), x, y, 1.0, steps=20, random_start=False)
    assert ind.unconstrained(float(masked.success.float().mean()), len(x)).passed is False


@pytest.mark.parametrize(
    ("k", "n", "low", "high"), [(0, 200, 0.0, 0.01828), (100, 200, 0.42866, 0.57134)]
)
def test_clopper_pearson_matches_the_exact_interval(k, n, low, high):
    lo, hi = clopper_pearson(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


class _Smoothness:
    """Flags images rougher (mean absolute neighbour difference) than ``limit``: a stand-in
    for the detectors a uniform-noise image trips."""

    def __init__(self, limit: float) -> None:
        self.limit = limit

    @staticmethod
    def roughness(x: Tensor) -> Tensor:
        return (x[..., 1:] - x[..., :-1]).abs().flatten(1).mean(1)

    def flags(self, x: Tensor) -> Tensor:
        return self.roughness(x) > self.limit


def test_unconstrained_run_takes_the_bounded_steps_from_the_clean_image(trained, blob_data):
    victim, _ = trained
    x, y = _correct(victim, *_xy(blob_data, 40))
    guard = _Smoothness(2 * float(_Smoothness.roughness(x).max()))
    bounded = AttackSpec("m", 16 / 255, steps=20, loss="margin")
    free = bounded.unconstrained()
    assert (free.eps, free.random_start) == (1.0, False)
    assert free.alpha == pytest.approx(bounded.alpha)
    with pytest.raises(MedsecError):
        replace(bounded, step_rule="apgd").unconstrained()

    def asr(spec: AttackSpec) -> float:
        return float(run_attack(victim, x, y, spec, detector=guard, seed=0).success.float().mean())

    wide = replace(bounded, eps=1.0)  # steps scaled to eps = 1, from a uniform-noise start
    assert ind.unconstrained(asr(wide), len(x)).passed is False  # measured 0.49
    assert ind.unconstrained(asr(free), len(x)).passed


def test_a_share_at_the_tolerance_passes_and_one_image_more_fails():
    """2 of 40 is exactly the tolerance (a float32 mean once read it as 0.0500000007)."""
    final = torch.zeros(40, dtype=torch.bool)
    at = torch.zeros(40, dtype=torch.bool)
    at[:2] = True
    assert ind.silent_success(at, final).passed and ind.transfer_failure(at, final).passed
    at[2] = True
    assert not ind.silent_success(at, final).passed

"""Square Attack: beats gradient masking, stays in budget, success only by the Criterion."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from medsec.attacks import (
    Criterion,
    Objective,
    logits_forward,
    margin,
    preset,
    run_attack,
    run_square,
    square,
)
from medsec.attacks.square import p_schedule, square_side
from medsec.errors import MedsecError
from medsec.evaluation.diagnostics import gradient_killed

EPS = 8 / 255


def _xy(blob_data, n):
    return torch.from_numpy(blob_data.test.images[:n]), torch.from_numpy(blob_data.test.labels[:n])


class CornerDetector:
    """Flags an image whose top-left pixel is bright: blind to the class, so some images the
    classifier gets wrong are flagged (the attack must then count them as failures)."""

    def flags(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, 0] > 0.35


class CountingObjective:
    """The margin objective, counting queries and the best value seen per example."""

    def __init__(self, model: torch.nn.Module, labels: torch.Tensor) -> None:
        self.inner = Objective(logits_forward(model), [(1.0, margin())], labels)
        self.queries: Counter[int] = Counter()
        self.best = torch.full((len(labels),), -torch.inf)

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        value = self.inner(x, idx)
        self.queries.update(idx.tolist())
        self.best[idx] = torch.maximum(self.best[idx], value.detach())
        return value


def test_square_beats_gradient_masking_that_stops_pgd(trained, blob_data):
    model, _ = trained
    x, y = _xy(blob_data, 30)
    masked = gradient_killed(model)
    pgd = run_attack(masked, x, y, preset("pgd-20", EPS))
    assert pgd.zero_grad_fraction == 1.0
    assert pgd.success.float().mean() <= 0.1
    res = run_square(masked, x, y, EPS, 250, batch_size=16)
    assert res.success.float().mean() >= 0.8
    # inside the eps-ball and [0, 1]; every reported success is a re-predicted one
    assert (res.x_adv - x).abs().max() <= EPS + 1e-6
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert torch.equal(res.success, Criterion(masked, y)(res.x_adv))
    assert res.spec.name == "square" and res.spec.steps == 250
    assert res.loss_curve[-1] > res.loss_curve[0]


def test_same_seed_same_result_other_seed_differs(trained, blob_data):
    model, _ = trained
    x, y = _xy(blob_data, 8)
    a, b = (run_square(model, x, y, EPS, 30, seed=3) for _ in range(2))
    c = run_square(model, x, y, EPS, 30, seed=4)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)
    assert not torch.equal(a.x_adv, c.x_adv)


def test_flagged_image_never_counts_as_success(trained, blob_data):
    model, _ = trained
    x, y = _xy(blob_data, 24)
    det = CornerDetector()
    res = run_square(model, x, y, EPS, 120, detector=det)
    fooled = model(res.x_adv).argmax(1) != y
    flagged = det.flags(res.x_adv)
    assert torch.equal(res.success, fooled & ~flagged)
    assert (fooled & flagged).any()  # the detector blocked some: the check above had teeth
    assert res.success.any()


def test_query_budget_and_best_iterate_for_failures(trained, blob_data):
    model, _ = trained
    x, y = _xy(blob_data, 12)
    queries = 40
    obj = CountingObjective(model, y)
    res = square(obj, x, Criterion(model, y), 1 / 255, queries, generator=torch.Generator())
    failed = (~res.success).nonzero()[:, 0].tolist()
    assert failed, "a 1/255 budget must leave failures on the trained victim"
    assert max(obj.queries.values()) == queries
    assert all(obj.queries[i] == queries for i in failed)
    assert len(res.loss_curve) == queries
    # a failure returns its best iterate, not its last candidate
    final = obj.inner(res.x_adv, torch.arange(len(y)))
    assert torch.allclose(final[failed], obj.best[failed])


def test_schedule_follows_the_paper_rescaled_to_the_budget():
    assert p_schedule(0.8, 10, 10000) == 0.8
    assert p_schedule(0.8, 11, 10000) == 0.4
    assert p_schedule(0.8, 9999, 10000) == pytest.approx(0.8 / 512)
    assert p_schedule(0.8, 100, 1000) == p_schedule(0.8, 1000, 10000) == 0.8 / 16
    assert square_side(0.8, 28, 28) == 25
    assert square_side(1e-6, 28, 28) == 1
    assert square_side(1.0, 28, 28) == 27


def test_eps_zero_and_bad_settings(trained, blob_data):
    model, _ = trained
    x, y = _xy(blob_data, 20)
    res = run_square(model, x, y, 0.0, 10)
    assert torch.equal(res.x_adv, x)
    assert torch.equal(res.success, model(x).argmax(1) != y)
    for kwargs in ({"eps": -0.1, "queries": 10}, {"eps": EPS, "queries": 0}):
        with pytest.raises(MedsecError):
            run_square(model, x, y, **kwargs)
    with pytest.raises(MedsecError):
        square(lambda a, i: a.sum((1, 2, 3)), x, Criterion(model, y), EPS, 5, p_init=0.0)

"""The attack engine: success on a trained model, budgets, losses, EOT/BPDA, the criterion."""

from __future__ import annotations

import math
from dataclasses import replace
from unittest import mock

import pytest
import torch
from torch import nn

from medsec.attacks import (
    BPDA,
    EOT,
    AttackSpec,
    Criterion,
    Objective,
    as_two_logits,
    cross_entropy,
    logits_forward,
    margin,
    preset,
    run_attack,
)
from medsec.attacks.criteria import eval_mode
from medsec.attacks.pgd import pgd
from medsec.attacks.precision import folded, native_bf16
from medsec.errors import MedsecError


def _xy(blob_data, n=120):
    return torch.from_numpy(blob_data.test.images[:n]), torch.from_numpy(blob_data.test.labels[:n])


def test_victim_learns(trained):
    _, metrics = trained
    assert metrics["clean_accuracy"] >= 0.9
    assert metrics["clean_auc"] >= 0.95


def test_pgd_linf_fools_trained_model_within_budget(trained, blob_data):
    model, _ = trained
    x, y = _xy(blob_data)
    eps = 8 / 255
    res = run_attack(model, x, y, preset("pgd-20", eps))
    assert res.success.float().mean() >= 0.9
    assert (res.x_adv - x).abs().max() <= eps + 1e-6
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    # success is exactly "the re-prediction is wrong"
    pred = model(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred != y)


def test_l2_budget_respected(trained, blob_data):
    model, _ = trained
    x, y = _xy(blob_data, 60)
    res = run_attack(model, x, y, preset("pgd-l2", 1.0))
    norms = (res.x_adv - x).flatten(1).norm(dim=1)
    assert norms.max() <= 1.0 + 1e-4
    assert res.success.float().mean() >= 0.9


def test_iterative_beats_single_step_and_asr_grows_with_eps(trained, blob_data):
    model, _ = trained
    x, y = _xy(blob_data)
    asr = {}
    for name in ("fgsm", "pgd-20"):
        for e in (1 / 255, 2 / 255, 4 / 255):
            asr[(name, e)] = run_attack(model, x, y, preset(name, e)).success.float().mean().item()
    for e in (1 / 255, 2 / 255, 4 / 255):
        assert asr[("pgd-20", e)] >= asr[("fgsm", e)]
    assert asr[("pgd-20", 1 / 255)] <= asr[("pgd-20", 2 / 255)] <= asr[("pgd-20", 4 / 255)]


def test_margin_loss_two_class_by_hand():
    z = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    y = torch.tensor([0, 0])
    out = {"logits": z}
    assert torch.allclose(margin()(out, y, False), torch.tensor([-3.0, 2.5]))
    t = torch.tensor([1, 1])
    assert torch.allclose(margin()(out, t, True), torch.tensor([-3.0, 2.5]))
    assert torch.allclose(margin(kappa=1.0)(out, y, False), torch.tensor([-3.0, 1.0]))


def test_margin_and_ce_three_class():
    z = torch.tensor([[1.0, 4.0, 2.0]])
    y = torch.tensor([1])
    assert margin()({"logits": z}, y, False).item() == pytest.approx(-2.0)
    ce = cross_entropy()({"logits": z}, y, False).item()
    assert ce == pytest.approx(-torch.log_softmax(z, 1)[0, 1].item())
    assert cross_entropy()({"logits": z}, y, True).item() == pytest.approx(-ce)


def test_single_logit_models_are_lifted():
    z = torch.tensor([0.3, -2.0])
    two = as_two_logits(z)
    assert two.shape == (2, 2)
    assert torch.allclose(torch.softmax(two, 1)[:, 1], torch.sigmoid(z))


def test_detector_flagging_everything_gives_zero_success(trained, blob_data):
    model, _ = trained
    x, y = _xy(blob_data, 50)

    class FlagAll:
        def flags(self, x):
            return torch.ones(len(x), dtype=torch.bool)

    res = run_attack(model, x, y, preset("pgd-20", 8 / 255), detector=FlagAll())
    assert res.success.sum() == 0


def test_targeted_attack_hits_target(trained, blob_data):
    model, _ = trained
    x, y = _xy(blob_data, 60)
    t = 1 - y
    res = run_attack(model, x, y, preset("pgd-20", 8 / 255, targeted=True), targets=t)
    assert res.success.float().mean() >= 0.9
    assert torch.equal(res.success, model(res.x_adv).argmax(1) == t)
    with pytest.raises(MedsecError):
        run_attack(model, x, y, preset("pgd-20", 8 / 255, targeted=True))


def test_eval_mode_during_attack_and_restored(trained, blob_data):
    model, _ = trained
    x, y = _xy(blob_data, 20)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, inp: seen.append(m.training))
    model.train()
    try:
        run_attack(model, x, y, preset("pgd-20", 2 / 255))
    finally:
        hook.remove()
    assert seen and not any(seen)
    assert model.training
    model.eval()


def test_eot_batched_equals_loop_and_averages():
    class Noisy(nn.Module):
        def forward(self, x):
            return torch.stack([x.flatten(1).sum(1), torch.randn(len(x))], 1)

    x = torch.zeros(3, 1, 2, 2)
    idx = torch.arange(3)
    obj = Objective(logits_forward(Noisy()), [(1.0, margin())], torch.zeros(3, dtype=torch.long))
    torch.manual_seed(0)
    loop = EOT(obj, 4000, batched=False)(x, idx)
    batched = EOT(obj, 4000, batched=True)(x, idx)
    assert loop.abs().max() < 0.1 and batched.abs().max() < 0.1  # E[noise - 0] = 0
    single = obj(x, idx)
    assert single.abs().max() > loop.abs().max()


class Quantise(nn.Module):
    """A gradient-killing step: 8-bit quantisation (zero gradient almost everywhere)."""

    def forward(self, x):
        return torch.round(x * 255) / 255


def test_gradient_killing_layer_is_detected_and_bpda_beats_it(trained, blob_data):
    model, _ = trained
    x, y = _xy(blob_data, 80)
    masked = nn.Sequential(Quantise(), model).eval()
    plain = run_attack(masked, x, y, preset("pgd-20", 8 / 255))
    assert plain.zero_grad_fraction == 1.0
    wrapped = nn.Sequential(BPDA(Quantise()), model).eval()
    assert torch.equal(wrapped(x), masked(x))  # forward unchanged
    res = run_attack(wrapped, x, y, preset("pgd-20", 8 / 255))
    assert res.success.float().mean() >= 0.9
    # success is judged on the deployed pipeline, quantisation included
    assert torch.equal(res.success, masked(res.x_adv).argmax(1) != y)


def test_identity_defence_is_beaten(trained, blob_data):
    model, _ = trained
    x, y = _xy(blob_data, 80)
    was = model.training
    res = run_attack(nn.Sequential(nn.Identity(), model), x, y, preset("cw-linf", 8 / 255))
    assert res.success.float().mean() >= 0.9
    assert model.training == was  # a wrapper in training mode leaves the shared victim alone


def test_restarts_and_steps_change_little_on_trained_model(trained, blob_data):
    model, _ = trained
    x, y = _xy(blob_data, 60)
    a = run_attack(model, x, y, preset("pgd-20", 2 / 255)).success.float().mean().item()
    b = run_attack(model, x, y, preset("pgd-100", 2 / 255)).success.float().mean().item()
    c = run_attack(model, x, y, preset("pgd-20", 2 / 255, restarts=4)).success.float().mean()
    assert b >= a - 0.02
    assert abs(b - a) <= 0.1 and abs(float(c) - a) <= 0.1


def test_early_stop_does_not_lower_success(trained, blob_data):
    model, _ = trained
    x, y = _xy(blob_data)
    on = run_attack(model, x, y, preset("pgd-20", 2 / 255)).success.float().mean()
    off = (
        run_attack(model, x, y, preset("pgd-20", 2 / 255, early_stop=False)).success.float().mean()
    )
    assert on >= off - 0.02


def test_eps_zero_is_clean_error_rate(trained, blob_data):
    model, _ = trained
    x, y = _xy(blob_data)
    res = run_attack(model, x, y, preset("pgd-20", 0.0))
    assert torch.equal(res.x_adv, x)
    assert torch.equal(res.success, Criterion(model, y)(x))


def test_spec_validation_and_record():
    with pytest.raises(MedsecError):
        AttackSpec("x", eps=-1)
    with pytest.raises(MedsecError):
        AttackSpec("x", eps=0.1, norm="l1")
    with pytest.raises(MedsecError):
        preset("nope", 0.1)
    rec = preset("pgd-20", 4 / 255).record()
    assert rec["alpha"] == pytest.approx(2.5 * 4 / 255 / 20)
    assert rec["kappa"] is None and rec["steps"] == 20
    assert math.isinf(preset("cw-linf", 0.1).kappa)


def test_restart_step_factors_change_the_step_per_restart(trained, blob_data):
    """Restart r steps with factor r (cycled); a tiny first step fails, the second restart's
    full-eps step then does what FGSM does, and only on the failures."""
    spec = AttackSpec("s", 8 / 255, steps=10, restarts=3, restart_step_factors=(2.5, 50.0))
    assert [spec.alpha_for(r) * 255 * 10 / 8 for r in range(3)] == pytest.approx([2.5, 50, 2.5])
    assert spec.record()["restart_step_factors"] == (2.5, 50.0)
    with pytest.raises(MedsecError):
        AttackSpec("s", 0.1, restart_step_factors=(1.0, 0.0))
    model, _ = trained
    x, y = _xy(blob_data)
    one = dict(steps=1, random_start=False, early_stop=False)
    tiny = run_attack(model, x, y, AttackSpec("t", 8 / 255, step_factor=0.01, **one))
    both = AttackSpec("b", 8 / 255, restarts=2, restart_step_factors=(0.01, 1.0), **one)
    fgsm = run_attack(model, x, y, preset("fgsm", 8 / 255))
    res = run_attack(model, x, y, both)
    assert tiny.success.float().mean() < 0.5 * fgsm.success.float().mean()
    assert torch.equal(res.success, tiny.success | fgsm.success)


class _Scripted(nn.Module):
    """Row r's k-th call is fooled per ``table[r, k]`` (row id in pixel 0); counts calls."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table, self.calls = table, torch.zeros(len(table), dtype=torch.long)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.flatten(1)[:, 0].long()
        fooled = self.table[rows, self.calls[rows]]
        self.calls[rows] += 1
        return torch.stack([(~fooled).float(), fooled.float()], 1)  # label 0 = correct


@pytest.mark.parametrize(("repeats", "quorum"), [(5, 0.8), (5, 0.5), (3, 0.8), (4, 0.5)])
def test_repeated_criterion_skips_only_calls_that_cannot_change_the_decision(repeats, quorum):
    table = torch.rand(64, repeats, generator=torch.Generator().manual_seed(repeats)) < 0.5
    table[:8] = False  # rows never fooled: decided as failures after the first hopeless call
    model = _Scripted(table)
    x = torch.arange(64, dtype=torch.float32).view(64, 1, 1, 1)
    got = Criterion(model, torch.zeros(64, dtype=torch.long), repeats=repeats, quorum=quorum)(x)
    assert torch.equal(got, table.float().mean(1) >= quorum)  # the rule over all calls
    need = math.ceil(quorum * repeats - 1e-9)
    assert (model.calls[:8] == repeats - need + 1).all()
    assert (model.calls <= repeats).all() and model.calls.sum() < 64 * repeats


def test_screened_criterion_needs_the_first_call_and_spends_one_call_on_a_correct_row():
    """The attack loop's rule: the first call fooled AND the quorum over all calls; a row
    the first call gets right is never called again."""
    table = torch.rand(64, 20, generator=torch.Generator().manual_seed(3)) < 0.85
    table[:8, 0] = False  # screened out although most of their calls are fooled
    model = _Scripted(table)
    x = torch.arange(64, dtype=torch.float32).view(64, 1, 1, 1)
    crit = Criterion(model, torch.zeros(64, dtype=torch.long), repeats=20, quorum=0.9, screen=True)
    got = crit(x)
    assert torch.equal(got, table[:, 0] & (table.float().mean(1) >= 0.9))
    assert (model.calls[:8] == 1).all() and got[8:].any()


@pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="no native bf16 on this CPU")
def test_fast_path_decides_like_fp32_on_a_trained_victim(trained, blob_data):
    """bf16 steps change borderline gradients, not the attack: the Criterion decides in fp32,
    and decisions and ASR agree with the fp32 path (same seed). Exact equality cannot hold:
    a bf16 gradient walks a slightly different path near the decision boundary."""
    model, _ = trained
    x, y = (torch.from_numpy(a) for a in (blob_data.test.images, blob_data.test.labels))
    ok = model(x).argmax(1) == y
    x, y = x[ok], y[ok]
    for eps in (2 / 255, 4 / 255):
        fast = run_attack(model, x, y, preset("pgd-20", eps, precision="auto"), seed=0)
        slow = run_attack(model, x, y, preset("pgd-20", eps, precision="fp32"), seed=0)
        assert fast.precision == "bf16" and slow.precision == "fp32"
        assert float((fast.success == slow.success).float().mean()) >= 0.98
        assert abs(float(fast.success.float().mean() - slow.success.float().mean())) <= 0.02
        with torch.no_grad():  # the loop's decisions are the fp32 model's decisions
            assert torch.equal(model(fast.x_adv).argmax(1) != y, fast.success)


class _RoundedAway(nn.Module):
    """Logits from relu(a - 256.5), a = w . x = 256.6 for a mid-grey image: fp32 keeps the
    0.1 and its gradient; bf16 rounds a to 256 (its spacing there is 2) and the ReLU, hence
    the gradient, is zero. An fp32-only gradient: the fast path must report it missing."""

    def __init__(self, pixels: int) -> None:
        super().__init__()
        self.a = nn.Linear(pixels, 1, bias=False)
        nn.init.constant_(self.a.weight, 256.6 / (0.5 * pixels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.a(x.flatten(1)).float() - 256.5) * 10
        return torch.cat([s, -s], dim=1)


@pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="no native bf16 on this CPU")
def test_gradient_lost_to_low_precision_is_counted_as_unavailable():
    model = _RoundedAway(8 * 8).eval()
    x, y = torch.full((4, 1, 8, 8), 0.5), torch.ones(4, dtype=torch.long)
    spec = preset("pgd-20", 1 / 255, random_start=False, early_stop=False)
    slow = run_attack(model, x, y, replace(spec, precision="fp32"))
    fast = run_attack(model, x, y, replace(spec, precision="bf16"))
    assert float(slow.unavailable_grad.mean()) == 0.0 and slow.zero_grad_fraction == 0.0
    assert float(fast.unavailable_grad.mean()) == 1.0 and fast.zero_grad_fraction == 1.0


def test_folded_twin_computes_the_victim_without_its_batchnorms(trained, blob_data):
    model, _ = trained
    x = torch.from_numpy(blob_data.test.images[:64])
    norms = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    with eval_mode(model):  # as run_attack calls it
        twin = folded(model)
        with torch.no_grad():
            want, got = model(x), twin(x)
    assert norms > 0 and twin is not model
    assert not any(type(m) is nn.BatchNorm2d for m in twin.modules())
    assert sum(type(m) is nn.BatchNorm2d for m in model.modules()) == norms  # left intact
    assert all(p.requires_grad for p in model.parameters())
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max().clamp_min(1))


def test_nothing_is_folded_where_a_hook_could_read_a_batchnorm(trained):
    model, _ = trained
    norm = next(m for m in model.modules() if type(m) is nn.BatchNorm2d)
    handle = norm.register_forward_hook(lambda *_: None)
    try:
        with eval_mode(model):
            assert folded(model) is model
    finally:
        handle.remove()
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    assert folded(plain) is plain  # nothing to fold


class _AskLog:
    """A randomised pipeline's criterion stand-in: records the step id (pixel 0 of the
    iterate) of every row it is asked about; ``win_at`` = the step whose iterate succeeds."""

    def __init__(self, repeats: int, win_at: int) -> None:
        self.repeats, self.win_at, self.asked = repeats, win_at, []

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        steps = x.flatten(1)[:, 0].round().long()
        self.asked += steps.tolist()
        return steps == self.win_at


def _scripted_loop(values: list[float], repeats: int, win_at: int, **spec_kw):
    """One image whose iterate at step t carries t in pixel 0 (the step rule moves it by
    one), and an objective scripted per step; returns the criterion's log and the result."""
    x = torch.zeros(1, 1, 1, 1)
    t = iter(range(len(values)))

    def objective(xa: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return (xa.sum() * 0 + values[next(t)]).expand(len(xa))

    class _Count:  # a step rule that writes the next step id into pixel 0
        def step(self, xa, grad, value, k):
            return torch.full_like(xa, float(k + 1))

        def keep(self, mask):
            pass

    crit = _AskLog(repeats, win_at)
    spec = AttackSpec("s", 1.0, steps=len(values), random_start=False, **spec_kw)
    with mock.patch("medsec.attacks.pgd._rule", lambda *a: _Count()):
        res = pgd(objective, x, crit, spec)
    return crit.asked, res


def test_randomised_criterion_is_asked_about_each_new_best_iterate_before_stepping():
    """On a randomised pipeline the loop asks only about iterates that are the restart's best
    so far (what it could return), at the iterate the objective was measured on."""
    values = [0.0, -1.0, 2.0, 1.0, 1.5, 3.0, 3.0, 0.0]
    asked, res = _scripted_loop(values, repeats=20, win_at=-1)
    assert asked == [0, 2, 5]  # 3.0 at step 6 only ties the best
    assert not res.success.any() and float(res.x_adv.flatten()[0]) == 5.0  # best, judged
    asked, res = _scripted_loop(values, repeats=20, win_at=2)
    assert asked == [0, 2] and res.success.all() and float(res.x_adv.flatten()[0]) == 2.0
    # a deterministic pipeline (one call per question) is asked after every step
    asked, res = _scripted_loop(values, repeats=1, win_at=-1)
    assert asked == list(range(1, len(values) + 1))

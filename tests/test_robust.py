"""Robustification defences: each trains a few steps, its forward and attack paths work;
the item-8 fixtures (identity, gradient-killing layer) fall to the adaptive machinery;
MedRDF's vote is reproducible under a fixed seed."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from medsec.attacks import EOT, AttackSpec, Objective, logits_forward, margin, run_attack
from medsec.data.base import Dataset, Split
from medsec.defences.robust import (
    DAEClassifier,
    DenoisingAutoEncoder,
    KMMNet,
    MedRDF,
    MedRDFAttackView,
    RobustMetricReject,
    RobustTrainConfig,
    reinitialised,
    train_dae,
    train_kmm,
    train_pgd_at,
    train_ssat,
)
from medsec.evaluation import diagnostics as diag
from medsec.models.training import TrainConfig, train_victim

FEW = RobustTrainConfig(epochs=1, batch_size=32, lr=1e-3, seed=0, max_steps=3)


def _blobs(n: int, seed: int) -> Split:
    """Textured background; class 1 has a bright 6x6 finding: a tiny CNN learns it at once."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.2, 0.5, (n, 1, 28, 28)).astype(np.float32)
    y = (np.arange(n) % 2).astype(np.int64)
    for i in np.nonzero(y)[0]:
        r, c = rng.integers(2, 20, 2)
        x[i, 0, r : r + 6, c : c + 6] += 0.35
    return Split(x.clip(0, 1), y)


@pytest.fixture(scope="module")
def setup() -> tuple:
    torch.manual_seed(0)
    data = Dataset("blobs", _blobs(300, 0), _blobs(40, 1), _blobs(60, 2), ("clear", "finding"))
    victim, meta = train_victim(data, TrainConfig(epochs=3, patience=3), progress=False)
    assert meta["clean_accuracy"] >= 0.9
    x = torch.from_numpy(data.test.images[:24])
    y = torch.from_numpy(data.test.labels[:24])
    return data, victim.eval(), x, y


def _ssat(data, victim):
    model = copy.deepcopy(victim)
    return model, model, lambda: train_ssat(model, data, FEW)


def _kmm(data, victim):
    model = KMMNet.from_victim(victim)
    return model, model, lambda: train_kmm(model, data, FEW)


def _dae(data, victim):
    torch.manual_seed(0)
    model = DAEClassifier(DenoisingAutoEncoder(data.channels), copy.deepcopy(victim))
    return model, model, lambda: train_dae(model, data, FEW)


def _pgd_at(data, victim):
    model = reinitialised(victim, seed=0)
    return model, model, lambda: train_pgd_at(model, data, FEW, eps=8 / 255, steps=2)


def _medrdf(data, victim):
    model = MedRDF(victim, votes=9, seed=0)
    return model, MedRDFAttackView(model, copies=1), None


@pytest.mark.parametrize("build", [_ssat, _kmm, _dae, _pgd_at, _medrdf])
def test_defence_trains_forwards_and_is_attackable(setup, build) -> None:
    data, victim, x, y = setup
    victim_before = {k: v.clone() for k, v in victim.state_dict().items()}
    pipeline, view, train = build(data, victim)
    before = {k: v.clone() for k, v in pipeline.state_dict().items()}
    if train is not None:
        record = train()
        assert record["steps"] == FEW.max_steps
        assert record["first_loss"] is not None and record["last_loss"] > 0
        changed = [
            k
            for k, v in pipeline.state_dict().items()
            if k in before and v.dtype.is_floating_point and not torch.equal(v, before[k])
        ]
        assert changed, "training changed no weight"
    assert all(torch.equal(v, victim.state_dict()[k]) for k, v in victim_before.items())
    pipeline.eval()
    with torch.no_grad():
        out = pipeline(x)
        assert out.shape == (len(x), 2) and torch.isfinite(out).all()
    eot = 4 if build is _medrdf else 1
    ok = out.argmax(1) == y
    x, y = x[ok], y[ok]
    spec = AttackSpec("adaptive-margin", 32 / 255, steps=8, loss="margin", eot_samples=eot)

    def factory(labels, idx):
        obj = Objective(logits_forward(view), [(1.0, margin())], labels)
        return EOT(obj, eot, batched=True) if eot > 1 else obj

    res = run_attack(pipeline, x, y, spec, objective_factory=factory, seed=0)
    assert res.x_adv.shape == x.shape
    assert (res.x_adv - x).abs().max() <= 32 / 255 + 1e-6
    assert res.zero_grad_fraction == 0.0 and res.nonfinite_grad_fraction == 0.0
    assert res.grad_norm_mean > 0 and len(res.loss_curve) >= 1
    assert res.success.dtype == torch.bool and res.success.float().mean() >= 0.9


def test_identity_and_gradient_killer_fall_to_adaptive_attack(setup) -> None:
    _, victim, x, y = setup
    ok = victim(x).argmax(1) == y
    res = diag.run_fixtures(victim, x[ok], y[ok], eps=32 / 255, steps=20, seed=0)
    assert not victim.training  # the wrappers left the shared victim in eval mode
    assert res["undefended"]["asr"] >= 0.98
    assert res["identity"]["asr"] == pytest.approx(res["undefended"]["asr"], abs=0.05)
    assert res["killer"]["zero_grad_fraction"] == 1.0  # plain PGD sees no gradient at all
    assert res["killer_bpda"]["zero_grad_fraction"] == 0.0
    assert res["killer_bpda"]["asr"] >= 0.98 > res["killer"]["asr"]


def test_medrdf_vote_is_deterministic_under_a_fixed_seed(setup) -> None:
    _, victim, x, _ = setup
    rdf = MedRDF(victim, sigma=0.1, votes=15, seed=123)
    with torch.no_grad():
        a = rdf(x)
        rdf.reseed(123)
        b = rdf(x)
        c = rdf.noisy_logits(x, 3)
        rdf.reseed(123)
        rdf(x)
        assert torch.equal(c, rdf.noisy_logits(x, 3))
        rdf.reseed(7)
        d = rdf.noisy_logits(x, 3)
    assert torch.equal(a, b)
    assert not torch.equal(c, d)  # another seed, other noise
    shares = a.exp()
    assert torch.allclose(shares.sum(1), torch.ones(len(x)), atol=1e-3)
    rm = rdf.robust_metric(x)
    assert ((rm >= 0.5) & (rm <= 1.0)).all()


def test_medrdf_reject_option_reads_the_diagnosis_vote(setup) -> None:
    """The RM threshold refuses <= 5% of the validation images it was fixed on, and the flag
    of an image is the RM of the very vote that gave its diagnosis (no second vote)."""
    data, victim, x, _ = setup
    rdf = MedRDF(victim, sigma=0.3, votes=9, seed=0)  # noisy enough for split votes
    x_val = torch.from_numpy(data.val.images)
    reject = RobustMetricReject.fit(rdf, x_val)
    assert round(reject.threshold * 9) / 9 == pytest.approx(reject.threshold)
    rdf.reseed(0)
    with torch.no_grad():
        assert float((rdf.robust_metric(x_val) < reject.threshold - 1e-9).float().mean()) <= 0.05
        rdf.reseed(5)
        shares = rdf(x).exp()
        state = rdf.generator.get_state()
        flags = reject.flags(x)
        assert torch.equal(rdf.generator.get_state(), state)  # no new noise drawn
        assert torch.equal(flags, shares.amax(1) < reject.threshold - 1e-9)
        reject.flags(x.clone())  # another tensor: a fresh vote
        assert not torch.equal(rdf.generator.get_state(), state)


def test_kmm_starts_as_the_victim_and_reports_saturation(setup) -> None:
    _, victim, x, _ = setup
    kmm = KMMNet.from_victim(victim).eval()
    with torch.no_grad():
        assert torch.allclose(kmm(x), victim(x), atol=1e-5)
    sat = kmm.saturation(x)
    assert set(sat) == {"kmm2", "kmm3"} and all(0.0 <= v <= 1.0 for v in sat.values())
    m = kmm.kmm2.mapping
    assert torch.equal(m.psi.detach(), torch.eye(m.psi.shape[0]))
    assert torch.all(m.beta.detach() == 2.0)


def test_pgd_at_warms_up_clean_then_ramps_eps_over_the_training_steps(setup, monkeypatch):
    """No attack during the clean warm-up; then eps grows linearly to the training eps over
    the ramp's steps and stays there."""
    from medsec.defences.robust import pgd_at
    from medsec.defences.robust.common import count_steps, minibatches

    data, victim, _, _ = setup
    cfg = RobustTrainConfig(epochs=2, batch_size=32, lr=1e-3, seed=0)
    taken = sum(1 for _ in minibatches(torch.zeros(300), torch.zeros(300), cfg))
    assert count_steps(300, cfg) == taken
    seen: list[float] = []
    real = pgd_at.run_attack
    monkeypatch.setattr(
        pgd_at,
        "run_attack",
        lambda m, x, y, spec, **k: (
            (spec.name == "pgd-at-train" and seen.append(spec.eps)) or real(m, x, y, spec, **k)
        ),
    )
    rec = train_pgd_at(reinitialised(victim, 0), data, cfg, eps=8 / 255, warm=0.25, ramp=0.5)
    warm, ramp = rec["eps_warm_steps"], rec["eps_ramp_steps"]
    assert (warm, ramp) == (round(0.25 * taken), round(0.5 * taken)) and warm > 0
    assert len(seen) == taken - warm
    assert seen == sorted(seen) and 0 < seen[0] < seen[-1] == pytest.approx(8 / 255)
    assert seen[ramp - 2] < 8 / 255 and seen[ramp - 1] == pytest.approx(8 / 255)


def test_pgd_at_starts_from_fresh_weights_and_keeps_its_best_robust_epoch(
    setup, monkeypatch
) -> None:
    """From scratch: new weights (seeded, the victim untouched); the model returned is the
    epoch whose robust validation accuracy was highest, not the last one."""
    from medsec.defences.robust import pgd_at

    data, victim, _, _ = setup
    before = {k: v.clone() for k, v in victim.state_dict().items()}
    a, b = reinitialised(victim, 1), reinitialised(victim, 1)
    for k, v in victim.state_dict().items():
        assert torch.equal(v, before[k])
        assert torch.equal(a.state_dict()[k], b.state_dict()[k])
    w = "net.0.weight" if "net.0.weight" in before else next(iter(before))
    assert not torch.equal(a.state_dict()[w], before[w])

    scores, states = iter([0.2, 0.7, 0.4]), []

    def scripted(model, *_a, **_k):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    monkeypatch.setattr(pgd_at, "robust_accuracy", scripted)
    cfg = RobustTrainConfig(epochs=3, batch_size=64, lr=1e-3, seed=0)
    rec = train_pgd_at(a, data, cfg, eps=4 / 255, steps=1)
    assert rec["best_epoch"] == 2 and rec["val_robust_accuracy"] == 0.7
    assert [h["epoch"] for h in rec["val_robust_history"]] == [1, 2, 3]
    assert all(torch.equal(v, states[1][k]) for k, v in a.state_dict().items())
    assert not all(torch.equal(v, states[2][k]) for k, v in a.state_dict().items())


class _NoteTaker:
    seed, device = 0, torch.device("cpu")

    def add_note(self, *_a, **_k) -> None:
        pass


def test_the_probe_of_a_randomised_pipeline_does_not_depend_on_what_ran_before(setup) -> None:
    """Its noise starts from the study seed, so a run whose earlier cells came from the cache
    (the Ray executor's report pass, a resumed run) records the same probe."""
    from medsec.defences import Deployed
    from medsec.evaluation.probe import probe_and_adapt

    _, victim, x, _ = setup
    rdf = MedRDF(victim, sigma=0.1, votes=9, seed=0)
    dep = Deployed(rdf, reseed=rdf.reseed)
    first = probe_and_adapt(_NoteTaker(), "medrdf", dep, x, 2, 3)[1]["probe"]
    with torch.no_grad():
        rdf(x)  # what an earlier, computed cell would have drawn
    torch.rand(5)
    again = probe_and_adapt(_NoteTaker(), "medrdf", dep, x, 2, 3)[1]["probe"]
    assert first == again and first["randomised"] and first["max_logit_change"] > 0

"""Detection defences: each detector's math on hand-checkable cases, the honest joint
criterion, and (on a small victim trained here) the adaptive attack beating the
non-adaptive one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from medsec.attacks import AttackSpec, preset, run_attack
from medsec.data.base import Dataset
from medsec.defences.base import FitData
from medsec.defences.detection import (
    DeepFeatureDetector,
    GaussianDetector,
    KDBUDetector,
    LIDDetector,
    threshold_at_fpr,
)
from medsec.defences.detection.adaptive import Hinge, detector_hinge, lambda_ladder_attack
from medsec.defences.detection.deepfeat import deepfeat_terms
from medsec.defences.detection.kd_bu import kernel_log_density, mc_dropout_uncertainty
from medsec.defences.detection.lid import lid_mle, lid_terms
from medsec.defences.detection.mgm import fit_gaussian, mahalanobis_sq


def test_lid_of_points_on_a_line_is_one_and_on_a_plane_two() -> None:
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 2, generator=gen)).Q.T  # 2 orthonormal directions
    line = torch.rand(600, 1, generator=gen) @ basis[:1]
    plane = torch.rand(3000, 2, generator=gen) @ basis
    lid_line = lid_mle(line[:100], line[100:], k=20).mean()
    lid_plane = lid_mle(plane[:200], plane[200:], k=20).mean()
    assert abs(float(lid_line) - 1.0) < 0.2
    assert abs(float(lid_plane) - 2.0) < 0.4


def test_lid_by_hand() -> None:
    # neighbours at distances 1, 2, 4: LID = -3 / (log 1/4 + log 2/4 + log 4/4) = 3 / log 8
    ref = torch.tensor([[1.0], [2.0], [4.0], [50.0]])
    assert float(lid_mle(torch.zeros(1, 1), ref, k=3)[0]) == pytest.approx(3 / math.log(8))


def test_mahalanobis_of_a_known_gaussian() -> None:
    d = torch.tensor([[1.0, 1.0]])
    assert float(mahalanobis_sq(d, torch.zeros(2), torch.diag(torch.tensor([1.0, 4.0])))) == 5.0
    rng = np.random.default_rng(0)
    cov = np.array([[4.0, 1.2], [1.2, 1.0]])
    mean, precision = fit_gaussian(rng.multivariate_normal([3.0, -1.0], cov, size=20000))
    np.testing.assert_allclose(mean, [3.0, -1.0], atol=0.05)
    np.testing.assert_allclose(precision, np.linalg.inv(cov), atol=0.05)
    # one standard deviation along the first principal axis has distance 1
    w, v = np.linalg.eigh(cov)
    point = torch.tensor(mean + np.sqrt(w[1]) * v[:, 1])[None].float()
    m2 = mahalanobis_sq(point, torch.tensor(mean).float(), torch.tensor(precision).float())
    assert float(m2) == pytest.approx(1.0, abs=0.03)


def test_kernel_density_of_a_known_point_set() -> None:
    from sklearn.neighbors import KernelDensity

    ref = torch.tensor([[0.0], [2.0]])
    # at x = 1 both kernels contribute phi(1): density = phi(1)
    expected = -0.5 - 0.5 * math.log(2 * math.pi)
    assert float(kernel_log_density(torch.tensor([[1.0]]), ref)) == pytest.approx(expected)
    rng = np.random.default_rng(1)
    pts, q = rng.normal(size=(50, 5)), rng.normal(size=(7, 5))
    skl = KernelDensity(bandwidth=1.0).fit(pts).score_samples(q)
    ours = kernel_log_density(torch.tensor(q).float(), torch.tensor(pts).float())
    np.testing.assert_allclose(ours.numpy(), skl, rtol=1e-4)


def test_bayesian_uncertainty_is_zero_without_dropout_effect() -> None:
    lin = nn.Linear(4, 2)
    feats = torch.rand(3, 4)
    assert torch.allclose(mc_dropout_uncertainty(feats, lin, 0.0), torch.zeros(3), atol=1e-6)
    nn.init.zeros_(lin.weight)  # outputs ignore the (dropped) features
    assert torch.allclose(mc_dropout_uncertainty(feats, lin, 0.5), torch.zeros(3), atol=1e-6)
    nn.init.normal_(lin.weight, std=3.0)
    assert bool((mc_dropout_uncertainty(feats, lin, 0.5) > 0).all())


def test_threshold_at_fpr() -> None:
    scores = np.arange(100.0)
    t = threshold_at_fpr(scores, 0.05)
    assert (scores > t).mean() == pytest.approx(0.05)
    assert (np.zeros(10) > threshold_at_fpr(np.zeros(10))).mean() == 0  # ties never flag


@pytest.fixture(scope="module")
def attack_set(blob_data: Dataset, trained: tuple[nn.Module, dict]) -> tuple:
    """The conftest victim and its first 100 correctly classified test images."""
    victim, metrics = trained
    assert metrics["clean_accuracy"] > 0.85
    x = torch.from_numpy(blob_data.test.images)
    y = torch.from_numpy(blob_data.test.labels)
    with torch.no_grad():
        ok = victim(x).argmax(1) == y
    return blob_data, victim, x[ok][:100], y[ok][:100]


class FlagAll:
    """A degenerate detector that flags every input."""

    def flags(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(x), dtype=torch.bool, device=x.device)


def test_flag_everything_detector_gives_asr_zero(attack_set: tuple) -> None:
    _, victim, x, y = attack_set
    res = run_attack(victim, x, y, preset("pgd-20", 8 / 255), detector=FlagAll())
    assert res.success.sum() == 0
    assert run_attack(victim, x, y, preset("pgd-20", 8 / 255)).success.float().mean() > 0.9


def test_gaussian_detector_threshold_and_adaptive_attack_beats_non_adaptive(
    attack_set: tuple,
) -> None:
    data, victim, x, y = attack_set
    det = GaussianDetector(victim)
    det.fit(torch.from_numpy(data.train.images), torch.from_numpy(data.train.labels))
    x_val = torch.from_numpy(data.val.images)
    det.set_threshold(x_val)
    assert int(det.flags(x_val).sum()) <= 0.05 * len(x_val)
    eps = 8 / 255
    plain = run_attack(victim, x, y, preset("pgd-20", eps, early_stop=False), detector=det)
    s_val = det.score_samples(x_val).numpy()
    hinge = Hinge.from_clean(s_val)
    assert hinge.aim == np.median(s_val) and hinge.aim < det.threshold
    spec = AttackSpec("adaptive", eps, steps=30)
    term = [(1.0, detector_hinge(det, hinge))]
    adaptive = lambda_ladder_attack(
        victim, det, x, y, spec, term, lambdas=(1.0, 10.0), aim=hinge.aim
    )
    asr_plain = float(plain.success.float().mean())
    asr_adaptive = float(adaptive.success.float().mean())
    assert asr_adaptive >= 0.9
    assert asr_adaptive >= asr_plain + 0.3, (asr_plain, asr_adaptive)
    # aiming at the clean median makes the scores look clean at ANY threshold
    s_adv = det.score_samples(adaptive.x_adv[adaptive.success]).numpy()
    auc = roc_auc_score(np.r_[np.zeros(len(s_val)), np.ones(len(s_adv))], np.r_[s_val, s_adv])
    assert adaptive.at_aim >= 0.8 * len(x) and auc <= 0.6, (adaptive.at_aim, auc)
    # an aim no score can reach: success is still judged (and kept) at the deployed threshold
    unreachable = lambda_ladder_attack(victim, det, x, y, spec, term, lambdas=(1.0,), aim=-np.inf)
    assert unreachable.at_aim == 0 and unreachable.success.float().mean() >= 0.8
    assert not bool(det.flags(unreachable.x_adv[unreachable.success]).any())
    # success is the joint criterion: every success is misclassified and not flagged
    ok = adaptive.success
    assert not bool(det.flags(adaptive.x_adv[ok]).any())
    with torch.no_grad():
        assert bool((victim(adaptive.x_adv[ok]).argmax(1) != y[ok]).all())


def test_kd_bu_detector_catches_pgd_and_adaptive_attack_evades(attack_set: tuple) -> None:
    data, victim, x, y = attack_set
    xt = torch.from_numpy(data.train.images)
    yt = torch.from_numpy(data.train.labels)
    det = KDBUDetector(victim)
    eps = 8 / 255
    adv_fit = run_attack(victim, xt[400:], yt[400:], preset("pgd-20", eps, early_stop=False))
    info = det.fit(xt, yt, adv_fit.x_adv)  # the last len(x_adv) clean images pair with x_adv
    assert len(det.reference_[0]) + len(det.reference_[1]) == 400  # fit images not in the KDE
    assert info["fit_cv_auc"] > 0.8
    x_val = torch.from_numpy(data.val.images)
    det.set_threshold(x_val)
    plain = run_attack(victim, x, y, preset("pgd-20", eps, early_stop=False), detector=det)
    hinge = Hinge.from_clean(det.score_samples(x_val).numpy())
    adaptive = lambda_ladder_attack(
        victim,
        det,
        x,
        y,
        AttackSpec("adaptive", eps, steps=30),
        [(1.0, detector_hinge(det, hinge))],
        lambdas=(1.0, 10.0),
    )
    asr_plain = float(plain.success.float().mean())
    asr_adaptive = float(adaptive.success.float().mean())
    assert asr_adaptive >= asr_plain + 0.3, (asr_plain, asr_adaptive)


@pytest.fixture(scope="module")
def fit_data(attack_set: tuple) -> FitData:
    """The detectors' fit data as the study builds it: reference / fit split, PGD fit set."""
    data, victim, _, _ = attack_set
    xt = torch.from_numpy(data.train.images)
    yt = torch.from_numpy(data.train.labels)
    adv = run_attack(victim, xt[400:], yt[400:], preset("pgd-20", 8 / 255, early_stop=False))
    val = torch.from_numpy(data.val.images)
    return FitData(xt[:400], yt[:400], xt[400:], adv.x_adv, val, 0, torch.device("cpu"))


@pytest.mark.parametrize(
    "make,terms", [(LIDDetector, lid_terms), (DeepFeatureDetector, deepfeat_terms)]
)
def test_supervised_detector_fits_flags_and_gives_the_attacker_gradients(
    attack_set: tuple, fit_data: FitData, make, terms
) -> None:
    """LID and the deep-feature forest through the one interface: fit on clean + adversarial,
    5% clean FPR on validation, adversarial test images caught, and the informed attacker's
    terms have finite, non-zero input gradients (a forest has none of its own)."""
    _, victim, x, y = attack_set
    fd = fit_data
    det = make(victim)
    with pytest.raises(Exception, match="supervised"):
        det.fit(torch.cat([fd.x_ref, fd.x_fit]), torch.cat([fd.y_ref, fd.y_ref[:0]]), None)
    yt = torch.cat([fd.y_ref, torch.zeros(len(fd.x_fit), dtype=torch.long)])
    det.fit(torch.cat([fd.x_ref, fd.x_fit]), yt, fd.x_adv)
    det.set_threshold(fd.x_val)
    assert int(det.flags(fd.x_val).sum()) <= 0.05 * len(fd.x_val)
    adv = run_attack(victim, x, y, preset("pgd-20", 8 / 255, early_stop=False))
    s_clean, s_adv = det.score_samples(x).numpy(), det.score_samples(adv.x_adv).numpy()
    auc = roc_auc_score(np.r_[np.zeros(len(x)), np.ones(len(x))], np.r_[s_clean, s_adv])
    assert auc > 0.8, auc
    weighted, desc = terms(det, fd)
    assert weighted and desc
    xa = adv.x_adv[:8].clone().requires_grad_(True)
    logits, feats = victim.forward_features(xa)
    out = {"logits": logits, **feats}
    target = logits.detach().argmax(1)  # the terms act where the victim predicts the target
    value = sum(w * t(out, target, True) for w, t in weighted).sum()
    (grad,) = torch.autograd.grad(value, xa)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_kd_bu_flags_are_a_function_of_the_image_not_of_its_batch(
    attack_set: tuple, fit_data: FitData
) -> None:
    """The deployed BU (and so score and flag) of an image is the same alone, in any batch
    order and in any batch size; the attacker's EOT score still draws fresh masks."""
    _, victim, x, y = attack_set
    fd = fit_data
    det = KDBUDetector(victim)
    det.fit(torch.cat([fd.x_ref, fd.x_fit]), torch.cat([fd.y_ref, fd.y_ref[:0]]), fd.x_adv)
    det.set_threshold(fd.x_val)
    adv = run_attack(victim, x, y, preset("pgd-20", 2 / 255, early_stop=False)).x_adv
    pool = torch.cat([x[:20], adv[:20]])
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(1))
    batch = det.score_samples(pool)
    shuffled = torch.empty_like(batch)
    shuffled[order] = det.score_samples(pool[order])
    alone = torch.cat([det.score_samples(pool[i : i + 1]) for i in range(len(pool))])
    assert torch.allclose(batch, shuffled, rtol=1e-5, atol=1e-5)
    assert torch.allclose(batch, alone, rtol=1e-5, atol=1e-5)
    assert torch.equal(det.flags(pool)[order], det.flags(pool[order]))
    _, feats = det.extract(pool[:4])
    pen = feats["penultimate"]
    assert not torch.equal(det.bu(pen, fresh=True), det.bu(pen, fresh=True))


class _Recorder:
    """A stand-in supervised detector that records what it is refitted on."""

    def __init__(self) -> None:
        self.fitted_on: int | None = None

    def fit(self, x_clean: torch.Tensor, y_clean: torch.Tensor, x_adv: torch.Tensor) -> None:
        self.fitted_on = len(x_adv)


def test_per_attack_refit_uses_only_that_attacks_pairs_and_skips_too_few() -> None:
    from medsec.evaluation.detection import MIN_REFIT_PAIRS, Fitted, refit_on_attack

    n = 3 * MIN_REFIT_PAIRS
    attack_of = torch.tensor([0] * (2 * MIN_REFIT_PAIRS) + [1] * (MIN_REFIT_PAIRS - 1) + [2])
    fit = FitData(
        x_ref=torch.zeros(4, 1, 2, 2), y_ref=torch.zeros(4, dtype=torch.long),
        x_fit=torch.zeros(n, 1, 2, 2), x_adv=torch.ones(n, 1, 2, 2),
        x_val=torch.zeros(2, 1, 2, 2), seed=0, device=torch.device("cpu"),
    )  # fmt: skip
    f = Fitted(_Recorder(), {}, [], "", 0.0, fit, torch.zeros(n, dtype=torch.long), attack_of)
    other = refit_on_attack(f, 0)
    assert other is not f.detector and other.fitted_on == 2 * MIN_REFIT_PAIRS
    assert f.detector.fitted_on is None  # the deployed detector is untouched
    assert refit_on_attack(f, 1) is None  # one pair short: no per-attack AUC, no crash
    assert refit_on_attack(f, 3) is None  # an attack that fooled nothing


def test_two_sided_rate_shows_an_attacker_who_overshot() -> None:
    from medsec.evaluation.detection_report import auc, two_sided_tpr

    rng = np.random.default_rng(0)
    clean = rng.normal(0, 1, 400)
    overshoot = rng.normal(-4, 0.2, 100)  # far below every clean score: AUC ~0
    assert auc(clean, overshoot) < 0.01
    assert float(np.mean(overshoot > np.quantile(clean, 0.95))) == 0.0  # one-sided sees none
    assert two_sided_tpr(clean, overshoot) == 1.0  # the lower tail catches them all
    inside = rng.normal(0, 1, 100)  # an attacker who lands inside the clean scores
    assert two_sided_tpr(clean, inside) <= 0.15
    assert two_sided_tpr(clean, np.array([])) is None

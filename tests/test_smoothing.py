"""Randomized smoothing, the negative control: its certificate must hold against the L2 attack,
the attack must still succeed well beyond the certified radius, and CERTIFY must abstain
where the classes are balanced under noise."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from scipy.stats import norm
from torch import Tensor, nn

from medsec.cache import ArtifactStore
from medsec.data.base import Dataset
from medsec.defences import BuildEnv, Deployed, get_defence
from medsec.defences.robust.smoothing import (
    ABSTAIN,
    ALPHA,
    SIGMA,
    RandomizedSmoothing,
    SmoothedAttackView,
    SmoothedClassifier,
)
from medsec.errors import MedsecError
from medsec.evaluation.certificates import certificate_check


class PixelThreshold(nn.Module):
    """Base classifier: class 1 iff the top-left pixel exceeds ``c`` (a known decision rule)."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: Tensor) -> Tensor:
        z = x[:, 0, 0, 0] - self.c
        return torch.stack([torch.zeros_like(z), z], 1)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> BuildEnv:
    store = ArtifactStore(tmp_path_factory.mktemp("artifacts"), "test")
    return BuildEnv((2 / 255,), 0, torch.device("cpu"), 64, store)


@pytest.fixture(scope="module")
def deployed(trained: tuple[nn.Module, dict], blob_data: Dataset, env: BuildEnv) -> Deployed:
    """The registered defence built on the test victim: fine-tuned with noise here (~10 s)."""
    return get_defence("randomized-smoothing").build(trained[0], blob_data, env)


def test_registered_builds_and_caches(
    deployed: Deployed, trained: tuple[nn.Module, dict], blob_data: Dataset, env: BuildEnv
) -> None:
    defence = get_defence("randomized-smoothing")
    assert isinstance(defence, RandomizedSmoothing)
    assert defence.reference and defence.family == "robustification"
    assert deployed.certify is not None and deployed.reseed is not None and deployed.eot > 1
    assert deployed.record["cached"] is False
    assert deployed.record["val_accuracy"] >= 0.85  # the noise-trained base, clean images
    x = torch.from_numpy(blob_data.test.images[:100])
    deployed.reseed(0)
    acc = deployed.pipeline(x).argmax(1) == torch.from_numpy(blob_data.test.labels[:100])
    assert acc.float().mean() >= 0.85  # the smoothed majority vote
    again = defence.build(trained[0], blob_data, env)
    assert again.record["cached"] is True
    assert again.record["artifact"] == deployed.record["artifact"]


def _wide(deployed: Deployed, sigma: float) -> Deployed:
    """The same noise-trained base smoothed at a larger sigma: the certificate holds for any
    base classifier, and here radii spread below the cap that n votes put on them."""
    base = deployed.classifier.base
    model = SmoothedClassifier(base, sigma=sigma, seed=0)
    return Deployed(
        model,
        attack_view=SmoothedAttackView(model),
        eot=8,
        reseed=model.reseed,
        certify=model.certify,
    )


@pytest.mark.parametrize("sigma", [None, 0.15])
def test_certificate_holds_inside_and_breaks_beyond(
    deployed: Deployed, blob_data: Dataset, sigma: float | None
) -> None:
    dep = deployed if sigma is None else _wide(deployed, sigma)
    x = torch.from_numpy(blob_data.test.images[:12])
    y = torch.from_numpy(blob_data.test.labels[:12])
    res = certificate_check(dep, x, y, steps=10, eot=8, seed=0, batch_size=250)
    assert res["certified_correct"] >= 8
    assert res["radius"]["min"] > 0
    inside, beyond = res["inside"], res["beyond"]
    assert inside["attacked"] == beyond["attacked"] == res["certified_correct"]
    assert inside["adversarial"] == 0 and inside["violations"] == 0
    assert inside["violation_indices"] == []
    # the same attack is not simply broken: at 4x the radius it wins on most images
    assert beyond["adversarial"] >= 0.5 * beyond["attacked"]
    assert beyond["violations"] == 0
    assert beyond["min_adversarial_distance_over_radius"] >= 1.0
    assert res["violations"] == 0


def test_overstated_radius_is_caught(deployed: Deployed, blob_data: Dataset) -> None:
    """The check can fail: a certify that claims 5x its radius gets violations."""
    assert deployed.certify is not None
    honest = deployed.certify

    def inflated(x: Tensor) -> tuple[Tensor, Tensor]:
        pred, radius = honest(x)
        return pred, 5 * radius

    lying = dataclasses.replace(deployed, certify=inflated)
    x = torch.from_numpy(blob_data.test.images[:8])
    y = torch.from_numpy(blob_data.test.labels[:8])
    res = certificate_check(lying, x, y, steps=10, eot=8, seed=0, batch_size=250)
    assert res["inside"]["violations"] >= 2
    assert len(res["inside"]["violation_indices"]) == res["inside"]["violations"]
    assert all(0 <= i < 8 for i in res["inside"]["violation_indices"])


def test_certify_abstains_when_balanced_and_is_exact_when_unanimous() -> None:
    smoothed = SmoothedClassifier(PixelThreshold(0.5), sigma=SIGMA, seed=0)
    balanced = torch.full((6, 1, 8, 8), 0.5)  # the pixel sits on the threshold: 50/50 votes
    pred, radius = smoothed.certify(balanced)
    assert (pred == ABSTAIN).all() and (radius == 0).all()
    assert (smoothed.predict(balanced) == ABSTAIN).all()
    clear = torch.full((3, 1, 8, 8), 0.5)
    clear[:, 0, 0, 0] = torch.tensor([5.0, 5.0, -5.0])  # 20 sigma away: every vote agrees
    pred, radius = smoothed.certify(clear, n0=32, n=200, alpha=ALPHA)
    assert pred.tolist() == [1, 1, 0]
    # all n votes for the class: Clopper-Pearson bound alpha^(1/n), radius sigma * Phi^-1 of it
    expected = SIGMA * norm.ppf(ALPHA ** (1 / 200))
    assert torch.allclose(radius, torch.full((3,), expected), rtol=1e-5)
    assert smoothed.predict(clear).tolist() == [1, 1, 0]


def test_reseed_repeats_the_vote() -> None:
    smoothed = SmoothedClassifier(PixelThreshold(0.5), sigma=SIGMA, votes=15)
    x = torch.full((32, 1, 4, 4), 0.5)
    smoothed.reseed(3)
    first = smoothed(x)
    smoothed.reseed(3)
    assert torch.equal(first, smoothed(x))
    assert not torch.equal(first, smoothed(x))  # without reseeding: fresh noise


def test_certificate_check_needs_a_certificate() -> None:
    dep = Deployed(PixelThreshold(0.5))
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(MedsecError, match="no certify"):
        certificate_check(dep, x, torch.zeros(2, dtype=torch.long))


def test_nothing_certified_nothing_attacked() -> None:
    model = SmoothedClassifier(PixelThreshold(0.5), sigma=SIGMA, seed=0)
    dep = Deployed(model, attack_view=SmoothedAttackView(model), certify=model.certify)
    x = torch.full((4, 1, 8, 8), 0.5)  # 50/50 votes: CERTIFY abstains on every image
    res = certificate_check(dep, x, torch.tensor([0, 1, 0, 1]), steps=2, eot=2)
    assert res["abstained"] == 4 and res["certified_correct"] == 0
    assert res["inside"]["attacked"] == 0 and res["violations"] == 0
    assert res["radius"]["min"] is None

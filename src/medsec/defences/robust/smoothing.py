"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): the study's negative control.

The smoothed classifier g(x) = argmax_c P(f(x + d) = c), d ~ N(0, sigma^2 I), is provably
constant on an L2 ball of radius sigma * Phi^-1(pA) around x (pA: the top class's
probability under noise). Its Monte Carlo procedures, as in the paper:

- PREDICT(x, n, alpha): n noisy votes; return the top class if a two-sided binomial test
  of its count against the runner-up's rejects p = 1/2 at level alpha, else abstain (-1).
- CERTIFY(x, n0, n, alpha): guess the top class from n0 votes, count it in n fresh votes,
  take the one-sided (1 - alpha) Clopper-Pearson lower bound pA_lower; abstain if
  pA_lower <= 1/2, else return the class and the radius sigma * Phi^-1(pA_lower).
  With probability >= 1 - alpha the class is g(x) and g is constant on that ball.

The base classifier is the victim fine-tuned on Gaussian-noise-augmented images (the
paper's training). The deployed module returns log vote shares of ``votes`` noisy copies
(argmax = majority vote); the noise comes from its own generator (``reseed``). Noise is
added in R^d without clamping, as in the paper (the certificate is about that g).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from scipy.stats import beta, binomtest, norm
from torch import Tensor, nn

from medsec.attacks import BPDA, as_two_logits
from medsec.data.base import Dataset
from medsec.defences import BuildEnv, Defence, Deployed, register_defence
from medsec.defences.robust.common import RobustTrainConfig, fit, train_config, trained
from medsec.defences.robust.medrdf import MajorityVote, MedRDF, SoftVote

SIGMA = 0.06  # noise level, [0,1] pixel units (see the assumptions)
NOISE_EPOCHS = 6
VOTES = 32  # noisy copies per forward of the deployed module
N0 = 32  # CERTIFY: selection votes
N = 200  # CERTIFY: estimation votes (the paper: 100,000; a CPU budget)
ALPHA = 0.001  # CERTIFY / PREDICT failure probability (the paper's value)
EOT_SAMPLES = 8
REPEATS = 3
ABSTAIN = -1


def train_noise(
    model: nn.Module,
    data: Dataset,
    cfg: RobustTrainConfig,
    *,
    sigma: float = SIGMA,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Fine-tune ``model`` in place on images plus N(0, sigma^2) noise; the training record."""
    gen = torch.Generator().manual_seed(cfg.seed)

    def loss_fn(step: int, xb: Tensor, yb: Tensor) -> Tensor:
        noise = torch.randn(xb.shape, generator=gen).to(xb) * sigma
        return nn.functional.cross_entropy(model(xb + noise), yb)

    rec = fit(model, data, cfg, loss_fn, device=device)
    rec.update(noise_sigma=sigma)
    return rec


def radius_of(p_lower: Tensor, sigma: float) -> Tensor:
    """Certified L2 radius sigma * Phi^-1(pA_lower) (0 where pA_lower <= 1/2)."""
    r = torch.as_tensor(norm.ppf(p_lower.double().numpy()), dtype=torch.float32) * sigma
    return torch.where(p_lower > 0.5, r, torch.zeros_like(r))


def clopper_pearson_lower(k: Tensor, n: int, alpha: float) -> Tensor:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a proportion from k of n."""
    kk = k.double().numpy()
    low = beta.ppf(alpha, kk, n - kk + 1)
    return torch.as_tensor(low).nan_to_num(0.0)  # k = 0 -> 0


class SmoothedClassifier(MedRDF):
    """g(x) by Monte Carlo over the base classifier ``base`` (see the module docstring): the
    noise stream, reseeding and majority vote of MedRDF's noisy-copy vote, without its clamp
    to [0, 1] (Cohen et al. add the noise as is); ``chunk`` caps the noisy images per base
    forward (memory)."""

    def __init__(
        self,
        base: nn.Module,
        sigma: float = SIGMA,
        votes: int = VOTES,
        seed: int = 0,
        chunk: int = 512,
    ) -> None:
        super().__init__(base, sigma, votes, seed, chunk)

    def noisy_logits(self, x: Tensor, copies: int) -> Tensor:
        """(copies, B, K) base logits of ``copies`` noisy versions of each image."""
        outs, done = [], 0
        per_call = max(1, self.chunk // max(1, len(x)))  # copies per base forward
        while done < copies:
            n = min(per_call, copies - done)
            done += n
            noise = torch.randn((n, *x.shape), generator=self.generator).to(x) * self.sigma
            logits = as_two_logits(self.base((x.unsqueeze(0) + noise).flatten(0, 1)))
            outs.append(logits.view(n, len(x), -1))
        return torch.cat(outs)

    @torch.no_grad()
    def counts(self, x: Tensor, n: int) -> Tensor:
        """(B, K) how often the base classifier predicts each class over n noisy copies."""
        logits = self.noisy_logits(x, n)
        return nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).sum(0)

    @torch.no_grad()
    def predict(self, x: Tensor, n: int = N, alpha: float = ALPHA) -> Tensor:
        """PREDICT: (B,) the top class, or -1 (abstain) where the binomial test fails."""
        top2 = self.counts(x, n).cpu().topk(2, dim=1)
        pred = top2.indices[:, 0]
        p = [binomtest(a, a + b, 0.5).pvalue for a, b in top2.values.tolist()]
        return torch.where(torch.tensor(p) <= alpha, pred, torch.full_like(pred, ABSTAIN))

    @torch.no_grad()
    def certify(
        self, x: Tensor, n0: int = N0, n: int = N, alpha: float = ALPHA
    ) -> tuple[Tensor, Tensor]:
        """CERTIFY: (B,) class or -1 (abstain), (B,) certified L2 radius (0 on abstain)."""
        guess = self.counts(x, n0).argmax(1)
        k = self.counts(x, n).gather(1, guess[:, None])[:, 0].cpu()
        radius = radius_of(clopper_pearson_lower(k, n, alpha), self.sigma)
        pred = torch.where(radius > 0, guess.cpu(), torch.full_like(guess.cpu(), ABSTAIN))
        return pred, radius


class SmoothedAttackView(nn.Module):
    """What the attacker differentiates: ``copies`` noisy copies per forward, the vote under
    BPDA (exact vote forward, gradient of the soft vote = the smoothed soft classifier)."""

    def __init__(self, smoothed: SmoothedClassifier, copies: int = 1) -> None:
        super().__init__()
        self.smoothed = smoothed
        self.copies = copies
        self.vote = BPDA(MajorityVote(), approx=SoftVote())

    def forward(self, x: Tensor) -> Tensor:
        return self.vote(self.smoothed.noisy_logits(x, self.copies))


@register_defence
class RandomizedSmoothing(Defence):
    name = "randomized-smoothing"
    paper = (
        "Cohen, Rosenfeld & Kolter: Certified adversarial robustness via randomized "
        "smoothing, ICML 2019 (the negative control: certified, must not be broken inside "
        "its radius)"
    )
    summary = "Gaussian-noise majority vote with a certified L2 radius (negative control)"
    assumptions = (
        f"sigma = {SIGMA} in [0,1] pixel units, half the paper's smallest CIFAR-10 value "
        "(0.12): on fundus-lesion (quick profile, 64 px) the smoothed classifier's validation "
        "accuracy was 0.50 at sigma 0.25, 0.59 at 0.12, 0.67 at 0.06 (victim 0.68), measured",
        f"base classifier: the victim fine-tuned with Gaussian noise augmentation for "
        f"{NOISE_EPOCHS} epochs with Adam (the paper trains from scratch with noise)",
        f"deployed prediction: majority of {VOTES} noisy votes (no abstain; ties go to the "
        "lower class index)",
        f"CERTIFY with n0 = {N0}, n = {N}, alpha = {ALPHA} (the paper: n0 = 100, n = 100,000; "
        f"so the largest certifiable radius is sigma * Phi^-1(alpha^(1/n)) = "
        f"{SIGMA * float(norm.ppf(ALPHA ** (1 / N))):.3f})",
        "noise added without clamping to [0, 1], as in the paper",
    )
    reference = True

    def build(self, victim: nn.Module, data: Dataset, env: BuildEnv) -> Deployed:
        base = copy.deepcopy(victim).to(env.device)
        cfg = train_config(env, epochs=NOISE_EPOCHS, lr=5e-4)
        rec = trained(
            env,
            self.name,
            base,
            cfg,
            lambda: train_noise(base, data, cfg, device=env.device),
            settings=f"-sigma{SIGMA:g}",
        )
        model = SmoothedClassifier(base.eval(), seed=env.seed).eval()
        return Deployed(
            model,
            attack_view=SmoothedAttackView(model, copies=1),
            eot=EOT_SAMPLES,
            repeats=REPEATS,
            bpda="majority vote: exact forward, backward = gradient of log mean softmax of the "
            "noisy copies (the smoothed soft classifier)",
            reseed=model.reseed,
            certify=model.certify,
            record=rec | {"sigma": SIGMA, "votes": VOTES, "n0": N0, "n": N, "alpha": ALPHA},
            max_images=40,
        )

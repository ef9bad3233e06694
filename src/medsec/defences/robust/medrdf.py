"""MedRDF (Xu, Zhang & Zhang 2021): a retrain-free inference defence.

For each image, ``votes`` noisy copies (Gaussian noise, clamped to [0, 1]) go through the
pretrained classifier; the majority vote is the diagnosis and the Robust Metric (RM) is the
vote share of the winning class (its confidence). Noise and vote live inside the module.

The module returns log vote shares (floored at 1e-4) as logits, so argmax = majority vote.
The noise comes from the module's own generator: ``reseed(seed)`` makes every following
forward pass (and so the vote) reproducible; without reseeding each call draws fresh noise,
as deployed.

The vote (argmax + counting) has no gradient: the adaptive attacker differentiates
:class:`MedRDFAttackView`, which replaces it by BPDA with the soft vote (log mean softmax
over the noisy copies) on the backward pass, and averages over the noise with EOT.

The paper gives the RM as the confidence of each diagnosis; deployed, a low-confidence
diagnosis goes to a human. :class:`RobustMetricReject` is that reject option, with its
threshold fixed beforehand on clean validation images (at most ``REJECT_RATE`` of them
rejected), as the detectors' thresholds are: an attack succeeds only where the vote is
wrong AND confident enough to be accepted. Label and RM come from the same vote, as
deployed (the flag reads the vote of the forward pass on the same tensor).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medsec.attacks import BPDA
from medsec.data.base import Dataset
from medsec.defences import BuildEnv, Defence, Deployed, register_defence
from medsec.defences.detection.base import CLEAN_FPR, threshold_at_fpr
from medsec.defences.robust.common import paper_grid

SIGMA = 0.05
VOTES = 25
FLOOR = 1e-4
EOT_SAMPLES = 10  # noise draws per attack step
REPEATS = 5  # evaluations of the randomised vote (majority of runs decides success)
REJECT_RATE = CLEAN_FPR  # clean validation images the RM reject option may refuse


class MajorityVote(nn.Module):
    """(V, B, K) logits of V noisy copies -> (B, K) log vote shares (argmax = majority)."""

    def forward(self, logits: Tensor) -> Tensor:
        k = logits.shape[-1]
        counts = nn.functional.one_hot(logits.argmax(-1), k).float().mean(0)
        return counts.clamp_min(FLOOR).log()


class SoftVote(nn.Module):
    """Differentiable stand-in for the vote: log of the mean softmax over the copies."""

    def forward(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, -1).mean(0).clamp_min(FLOOR).log()


class MedRDF(nn.Module):
    """Noisy copies -> pretrained classifier -> majority vote (see module docstring)."""

    def __init__(
        self,
        base: nn.Module,
        sigma: float = SIGMA,
        votes: int = VOTES,
        seed: int = 0,
        chunk: int = 8,
    ) -> None:
        super().__init__()
        self.base = base
        self.sigma = sigma
        self.votes = votes
        self.chunk = chunk
        self.vote = MajorityVote()
        self.generator = torch.Generator()
        self.last: tuple[Tensor, Tensor] | None = None  # (input, its RM) of the last vote
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the noise stream: the same seed gives the same copies and votes."""
        self.generator.manual_seed(seed)

    def noisy_logits(self, x: Tensor, copies: int) -> Tensor:
        """(copies, B, K) logits of ``copies`` noisy versions of each image."""
        outs = []
        for s in range(0, copies, self.chunk):
            n = min(self.chunk, copies - s)
            noise = torch.randn((n, *x.shape), generator=self.generator).to(x) * self.sigma
            xs = (x.unsqueeze(0) + noise).clamp(0, 1).flatten(0, 1)
            outs.append(self.base(xs).view(n, len(x), -1))
        return torch.cat(outs)

    def forward(self, x: Tensor) -> Tensor:
        out = self.vote(self.noisy_logits(x, self.votes))
        self.last = (x, out.detach().exp().amax(1))
        return out

    @torch.no_grad()
    def robust_metric(self, x: Tensor) -> Tensor:
        """RM: the winning class's vote share per image, in [1/K, 1] (of the last vote when
        it was cast on this very tensor, else of a fresh vote)."""
        if self.last is None or self.last[0] is not x:
            self.forward(x)
        assert self.last is not None
        return self.last[1]


class RobustMetricReject:
    """MedRDF's reject option: flags (refuses) a diagnosis whose RM is below ``threshold``."""

    def __init__(self, medrdf: MedRDF, threshold: float) -> None:
        self.medrdf = medrdf
        self.threshold = threshold

    @classmethod
    @torch.no_grad()
    def fit(cls, medrdf: MedRDF, x_val: Tensor, batch_size: int = 250) -> RobustMetricReject:
        """The threshold refusing at most ``REJECT_RATE`` of clean validation images."""
        rm = torch.cat([medrdf.robust_metric(x_val[s : s + batch_size])
                        for s in range(0, len(x_val), batch_size)]).cpu().numpy()  # fmt: skip
        return cls(medrdf, -threshold_at_fpr(-rm, REJECT_RATE))  # refuse RM < t = flag -RM > -t

    def flags(self, x: Tensor) -> Tensor:
        return self.medrdf.robust_metric(x) < self.threshold - 1e-9


class MedRDFAttackView(nn.Module):
    """What the adaptive attacker differentiates: ``copies`` noisy copies per forward, and
    the vote under BPDA (exact vote forward, soft-vote gradient backward)."""

    def __init__(self, medrdf: MedRDF, copies: int = 1) -> None:
        super().__init__()
        self.medrdf = medrdf
        self.copies = copies
        self.vote = BPDA(MajorityVote(), approx=SoftVote())

    def forward(self, x: Tensor) -> Tensor:
        return self.vote(self.medrdf.noisy_logits(x, self.copies))


@register_defence
class MedRDFDefence(Defence):
    name = "medrdf"
    paper = (
        "Xu, Zhang & Zhang: MedRDF: a robust and retrain-less diagnostic framework for "
        "medical pretrained models against adversarial attack, IEEE TMI 2022 (arXiv 2021)"
    )
    summary = "noisy copies + majority vote, retrain-free"
    assumptions = (
        f"sigma = {SIGMA} and {VOTES} votes (the paper's exact values were not available)",
        "ties go to the lower class index",
        f"the Robust Metric (vote share) as a reject option refusing <= {REJECT_RATE:.0%} of "
        "clean validation images (the paper reports RM as the diagnosis's confidence)",
    )
    working_eps = 1 / 255

    def build(self, victim: nn.Module, data: Dataset, env: BuildEnv) -> Deployed:
        model = MedRDF(victim, seed=env.seed).eval()
        x_val = torch.from_numpy(data.val.images).to(env.device)
        reject = RobustMetricReject.fit(model, x_val, env.batch_size)
        model.reseed(env.seed)
        return Deployed(
            model,
            detector=reject,
            paper_attacks=paper_grid(env.eps),
            transfer=True,
            attack_view=MedRDFAttackView(model, copies=1),
            eot=EOT_SAMPLES,
            repeats=REPEATS,
            bpda="majority vote: exact forward, backward = gradient of log mean softmax of the "
            "copies",
            reseed=model.reseed,
            record={
                "retrain_free": True,
                "sigma": model.sigma,
                "votes": model.votes,
                "reject_below_rm": reject.threshold,
                "reject_rate_target": REJECT_RATE,
            },
            max_images=100,
        )

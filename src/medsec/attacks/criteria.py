"""The one place that decides attack success: re-predict through the deployed pipeline.

Success = the pipeline's prediction is wrong (untargeted) or the target (targeted), AND, when
a detector guards the pipeline, the detector does not flag the image at its threshold fixed
beforehand on clean data. Every attack result, every table and every early stop uses this.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import Tensor, nn

from medsec.attacks.losses import as_two_logits

# The attack loop's rule on a randomised pipeline: stop only once LOOP_QUORUM of
# LOOP_REPEATS fresh calls are fooled. The loop tests many iterates, so a lax rule stops on a
# lucky draw (winner's curse), and the final majority re-evaluation then flips the point.
# Measured on MedRDF (full profile, 100 images): 4 of 5 calls left 16-20% of the loop's
# successes failing the final majority (silent success); the stricter rule only stops on
# points that fool >= ~90% of calls, and the sequential test keeps failing rows at 3 calls.
LOOP_QUORUM = 0.9
LOOP_REPEATS = 20


class Flagger(Protocol):
    """Anything with ``flags(x) -> BoolTensor`` (a fitted detector at its fixed threshold)."""

    def flags(self, x: Tensor) -> Tensor: ...


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run the deployed (eval-mode) pipeline, then restore every submodule's own mode.

    Per submodule, not ``module.train(was)``: that would push the wrapper's mode into a
    shared victim inside it (a fresh ``nn.Sequential(..., victim)`` is in training mode)."""
    was = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in was:
            m.training = mode


class Criterion:
    """Success of adversarial images for a batch with fixed true labels (and targets)."""

    def __init__(
        self,
        pipeline: nn.Module,
        labels: Tensor,
        targets: Tensor | None = None,
        detector: Flagger | None = None,
        repeats: int = 1,
        quorum: float = 0.5,
        screen: bool = False,
    ) -> None:
        self.pipeline = pipeline
        self.labels = labels
        self.targets = targets
        self.detector = detector
        self.repeats = max(1, repeats)
        self.quorum = quorum
        self.screen = screen

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Labels the deployed pipeline assigns (in eval mode; its own randomness kept)."""
        with eval_mode(self.pipeline):
            return as_two_logits(self.pipeline(x)).argmax(1)

    @torch.no_grad()
    def __call__(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        """Bool (B,): success of each row of ``x`` (rows are ``idx`` of the full batch).

        With ``repeats`` > 1 (a randomised pipeline) a row succeeds when at least ``quorum``
        of that many fresh calls succeed: the final re-evaluation's rule is the majority
        (:func:`majority`); an attack loop asks for more (:data:`LOOP_QUORUM`) so that it
        does not stop on a point that fools only half of the draws. With ``screen`` the
        first call must succeed too (a stricter rule: a row the pipeline still gets right
        costs one call, not the several a lone quorum needs to rule it out)."""
        idx = torch.arange(len(x), device=x.device) if idx is None else idx
        if self.repeats == 1:
            return self._once(x, idx)
        # sequential: a row is drawn again only while the remaining calls can still change
        # its decision (same rule as all calls, 2-5x fewer calls where most rows fail)
        need = next(w for w in range(self.repeats + 1) if w / self.repeats >= self.quorum)
        wins = torch.zeros(len(x), dtype=torch.long, device=x.device)
        open_ = torch.arange(len(x), device=x.device)
        for call in range(self.repeats):
            wins[open_] += self._once(x[open_], idx[open_]).to(wins.device)
            w, left = wins[open_], self.repeats - call - 1
            alive = (w < need) & (w + left >= need)
            if self.screen and call == 0:
                alive &= w > 0
            open_ = open_[alive]
            if len(open_) == 0:
                break
        return wins >= need

    def _once(self, x: Tensor, idx: Tensor) -> Tensor:
        pred = self.predict(x)
        if self.targets is not None:
            ok = pred == self.targets[idx]
        else:
            ok = pred != self.labels[idx]
        if self.detector is not None:
            ok = ok & ~self.detector.flags(x).to(ok.device)
        return ok


def loop_criterion(
    pipeline: nn.Module,
    labels: Tensor,
    targets: Tensor | None = None,
    detector: Flagger | None = None,
    repeats: int = 1,
) -> Criterion:
    """The attack loop's Criterion: one call for a deterministic pipeline; for a randomised
    one (``repeats`` > 1) at least :data:`LOOP_REPEATS` calls with quorum :data:`LOOP_QUORUM`,
    the first call screening (measured on MedRDF: the criterion was 75% of the attack's time
    at 3 calls per failing row, 1 with the screen)."""
    if repeats <= 1:
        return Criterion(pipeline, labels, targets, detector)
    n = max(repeats, LOOP_REPEATS)
    return Criterion(pipeline, labels, targets, detector, n, LOOP_QUORUM, screen=True)


def success_runs(
    pipeline: nn.Module,
    x: Tensor,
    labels: Tensor,
    *,
    detector: Flagger | None = None,
    repeats: int = 1,
    reseed: Callable[[int], None] | None = None,
    seed: int = 0,
    batch_size: int = 250,
) -> Tensor:
    """(repeats, N) success of ``x`` by the one Criterion, each run with fresh randomness
    (``reseed(seed + 7919 * run)`` where the pipeline can be reseeded). A randomised
    pipeline's per-example success is the majority of runs (:func:`majority`)."""
    device = next(iter(pipeline.parameters()), torch.empty(0)).device
    out = []
    for r in range(repeats):
        if reseed is not None:
            reseed(seed + 7919 * (r + 1))
        ok = [
            Criterion(pipeline, labels[s : s + batch_size].to(device), detector=detector)(
                x[s : s + batch_size].to(device)
            ).cpu()
            for s in range(0, len(x), batch_size)
        ]
        out.append(torch.cat(ok) if ok else torch.zeros(0, dtype=torch.bool))
    return torch.stack(out)


def majority(runs: Tensor) -> Tensor:
    """Per example: success in at least half of the repeated evaluations (the one rule)."""
    return runs.float().mean(0) >= 0.5

"""The one place that decides attack success: re-predict through the deployed pipeline.

Success = the pipeline's prediction is wrong (untargeted) or the target (targeted), AND, when
a detector guards the pipeline, the detector does not flag the image at its threshold fixed
beforehand on clean data. Every attack result, every table and every early stop uses this.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from medsec.attacks.losses import as_two_logits


class Flagger(Protocol):
    """Anything with ``flags(x) -> BoolTensor`` (a fitted detector at its fixed threshold)."""

    def flags(self, x: Tensor) -> Tensor: ...


class Criterion:
    """Success of adversarial images for a batch with fixed true labels (and targets)."""

    def __init__(
        self,
        pipeline: nn.Module,
        labels: Tensor,
        targets: Tensor | None = None,
        detector: Flagger | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.labels = labels
        self.targets = targets
        self.detector = detector

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Labels the deployed pipeline assigns (in eval mode; its own randomness kept)."""
        was = self.pipeline.training
        self.pipeline.eval()
        try:
            return as_two_logits(self.pipeline(x)).argmax(1)
        finally:
            self.pipeline.train(was)

    @torch.no_grad()
    def __call__(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        """Bool (B,): success of each row of ``x`` (rows are ``idx`` of the full batch)."""
        idx = torch.arange(len(x), device=x.device) if idx is None else idx
        pred = self.predict(x)
        if self.targets is not None:
            ok = pred == self.targets[idx]
        else:
            ok = pred != self.labels[idx]
        if self.detector is not None:
            ok = ok & ~self.detector.flags(x).to(ok.device)
        return ok

"""Shared training plumbing of the robustification defences: config, minibatches, caching,
and the papers' attack grid."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from medsec.attacks import AttackSpec, preset
from medsec.data.base import Dataset
from medsec.defences.base import BuildEnv
from medsec.models.training import evaluate
from medsec.utils import seed_everything


@dataclass(frozen=True)
class RobustTrainConfig:
    """Training budget of one defence (small on purpose: the study must fit 2 CPU cores).

    ``max_steps`` caps optimiser steps (0 = no cap); tests use it to train a few steps.
    """

    epochs: int = 2
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    max_steps: int = 0

    def record(self) -> dict[str, Any]:
        return asdict(self)


def count_steps(n: int, cfg: RobustTrainConfig) -> int:
    """How many minibatches ``minibatches`` yields for ``n`` images (same ranges, no data)."""
    per_epoch = len(range(0, n - 1, cfg.batch_size))
    steps = cfg.epochs * per_epoch
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def minibatches(
    x: Tensor, y: Tensor, cfg: RobustTrainConfig
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(step, images, labels) over ``cfg.epochs`` shuffled epochs, stopping at ``max_steps``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - 1, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            if cfg.max_steps and step >= cfg.max_steps:
                return
            yield step, x[idx], y[idx]
            step += 1


def fit(
    model: nn.Module,
    data: Dataset,
    cfg: RobustTrainConfig,
    loss_fn: Callable[[int, Tensor, Tensor], Tensor],
    *,
    device: torch.device | str = "cpu",
    params: list[nn.Parameter] | None = None,
    x: Tensor | None = None,
    y: Tensor | None = None,
    epoch_end: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Adam on ``loss_fn(step, xb, yb)`` over the training split (or the given ``x, y``);
    ``epoch_end(epoch)`` after each full epoch (1-based).

    Returns the training record: losses, steps, seconds, validation accuracy at the end.
    """
    seed_everything(cfg.seed)
    x = torch.from_numpy(data.train.images) if x is None else x
    y = torch.from_numpy(data.train.labels) if y is None else y
    opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=cfg.lr)
    start = time.perf_counter()
    losses: list[float] = []
    per_epoch = len(range(0, len(x) - 1, cfg.batch_size))
    model.train()
    for step, xb, yb in minibatches(x, y, cfg):
        loss = loss_fn(step, xb.to(device), yb.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if epoch_end is not None and (step + 1) % per_epoch == 0:
            epoch_end((step + 1) // per_epoch)
        model.train()  # an attack inside loss_fn or epoch_end may have switched to eval mode
    model.eval()
    val = evaluate(model, data.val, device)
    return {
        "config": cfg.record(),
        "steps": len(losses),
        "first_loss": losses[0] if losses else None,
        "last_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "val_accuracy": val["accuracy"],
        "train_seconds": time.perf_counter() - start,
    }


def train_config(env: BuildEnv, epochs: int, lr: float) -> RobustTrainConfig:
    """The study's training budget for one defence (batch 64, the study's seed)."""
    return RobustTrainConfig(epochs=epochs, batch_size=64, lr=lr, seed=env.seed)


def trained(
    env: BuildEnv,
    name: str,
    model: nn.Module,
    cfg: RobustTrainConfig,
    train: Callable[[], dict[str, Any]],
    settings: str = "",
) -> dict[str, Any]:
    """Train once through the study's artefact store; the artefact name holds the config and
    the defence's own ``settings`` (cells key on it)."""
    cfg_tag = "-".join(f"{v}" for v in cfg.record().values())
    return env.store.trained(f"robust/{name}-{cfg_tag}{settings}", model, train)


def paper_grid(eps: tuple[float, ...]) -> list[AttackSpec]:
    """FGSM and PGD-20 at every study eps: the robustification papers' white-box attacks."""
    return [preset(a, e) for a in ("fgsm", "pgd-20") for e in eps]

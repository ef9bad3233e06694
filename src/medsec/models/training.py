"""Train a victim with early stopping on validation ROC-AUC; evaluate accuracy and AUC."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm.auto import tqdm

from medsec.data.base import Dataset, Split
from medsec.errors import MedsecError
from medsec.models.architectures import Victim, create_model
from medsec.utils import seed_everything


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> np.ndarray:
    """Softmax probabilities (N, K) in eval mode, batched."""
    was_training = model.training
    model.eval()
    x = torch.as_tensor(images)
    out = []
    for i in range(0, len(x), batch_size):
        out.append(torch.softmax(model(x[i : i + batch_size].to(device)), 1).float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def auc_score(labels: np.ndarray, proba: np.ndarray) -> float:
    """ROC-AUC: positive-class probability for 2 classes, macro one-vs-rest otherwise."""
    if len(np.unique(labels)) < 2:
        return float("nan")
    if proba.shape[1] == 2:
        return float(roc_auc_score(labels, proba[:, 1]))
    return float(roc_auc_score(labels, proba, multi_class="ovr", labels=np.arange(proba.shape[1])))


def evaluate(
    model: nn.Module, split: Split, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Clean accuracy and ROC-AUC on a split."""
    proba = predict_proba(model, split.images, device=device)
    return {
        "accuracy": float((proba.argmax(1) == split.labels).mean()),
        "auc": auc_score(split.labels, proba),
    }


@dataclass
class TrainConfig:
    """Settings of victim training (recorded in the checkpoint)."""

    arch: str = "small-cnn"
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 6
    seed: int = 0


def train_victim(
    data: Dataset, cfg: TrainConfig, *, device: torch.device | str = "cpu", progress: bool = True
) -> tuple[Victim, dict[str, Any]]:
    """Adam + cosine schedule; keep the weights of the epoch with the best validation AUC."""
    if cfg.epochs < 1:
        raise MedsecError(f"epochs must be at least 1, got {cfg.epochs}")
    seed_everything(cfg.seed)
    model = create_model(
        cfg.arch, in_channels=data.channels, num_classes=data.num_classes, image_size=data.size
    ).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    x = torch.from_numpy(data.train.images)
    y = torch.from_numpy(data.train.labels)
    gen = torch.Generator().manual_seed(cfg.seed)
    best_key, best_state, best_epoch, since = (-1.0, -1.0), None, 0, 0
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc=f"train {cfg.arch}", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            loss = nn.functional.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        sched.step()
        val = evaluate(model, data.val, device)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": total / len(x),
                "val_accuracy": val["accuracy"],
                "val_auc": val["auc"],
            }
        )
        bar.set_postfix(loss=f"{total / len(x):.3f}", val_auc=f"{val['auc']:.3f}")
        key = (val["auc"], val["accuracy"])  # ties in AUC (e.g. 1.0) go to the better-calibrated
        if key > best_key:
            best_key, best_epoch, since = key, epoch + 1, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since += 1
            if since >= cfg.patience:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    test = evaluate(model, data.test, device)
    metrics = {
        "clean_accuracy": test["accuracy"],
        "clean_auc": test["auc"],
        "val_auc": best_key[0],
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_time_s": time.perf_counter() - start,
        "history": history,
    }
    return model, metrics

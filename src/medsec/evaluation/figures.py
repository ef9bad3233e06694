"""Figures of the report (matplotlib, Agg backend, PNG written atomically)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from torch import Tensor

from medsec.utils import atomic_write_bytes


def save(fig: plt.Figure, path: Path) -> None:
    """Write a figure as PNG atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_asr_vs_eps(
    path: Path,
    series: dict[str, list[tuple[float, float]]],
    title: str,
    ylabel: str = "attack success rate",
) -> None:
    """One line per attack (or defence): y vs eps in /255 units, log-2 x axis."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in series.items():
        eps = [e * 255 for e, _ in pts]
        ax.plot(eps, [v for _, v in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("eps (L-inf, x/255 of the [0,1] pixel range)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8)
    save(fig, path)


def show_image(ax: plt.Axes, img: np.ndarray) -> None:
    """A (C, H, W) image in [0, 1] on ``ax``: grey or RGB, clipped, no ticks."""
    if img.shape[0] == 1:
        ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.clip(img.transpose(1, 2, 0), 0, 1))
    ax.set_xticks([])
    ax.set_yticks([])


def plot_examples(
    path: Path,
    x: Tensor,
    y: Tensor,
    panels: Sequence[tuple[float, Tensor, Tensor]],
    class_names: Sequence[str],
) -> None:
    """Rows: images. Columns: clean, then per budget the adversarial image and its
    perturbation amplified to the full range (mid-grey = unchanged)."""
    n = len(x)
    cols = 1 + 2 * len(panels)
    fig, axes = plt.subplots(n, cols, figsize=(1.7 * cols, 1.8 * n), squeeze=False)
    for i in range(n):
        show_image(axes[i, 0], x[i].numpy())
        axes[i, 0].set_title(f"clean: {class_names[int(y[i])]}", fontsize=7)
        for j, (eps, adv, pred) in enumerate(panels):
            delta = (adv[i] - x[i]).numpy()
            show_image(axes[i, 1 + 2 * j], adv[i].numpy())
            axes[i, 1 + 2 * j].set_title(
                f"{eps * 255:g}/255: {class_names[int(pred[i])]}", fontsize=7
            )
            scale = max(float(np.abs(delta).max()), 1e-8)
            show_image(axes[i, 2 + 2 * j], 0.5 + 0.5 * delta / scale)
            axes[i, 2 + 2 * j].set_title(f"perturbation x{0.5 / scale:.0f}", fontsize=7)
    save(fig, path)


def plot_grid(
    path: Path, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
) -> None:
    """A 4-column grid of images titled with their class (for `medsec data --preview`)."""
    n = len(images)
    rows = max(1, (n + 3) // 4)
    fig, axes = plt.subplots(rows, 4, figsize=(7, 1.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        show_image(ax, images[i])
        ax.set_title(class_names[int(labels[i])], fontsize=8)
    save(fig, path)


def plot_headline(
    path: Path,
    labels: Sequence[str],
    panels: Sequence[tuple[float, Sequence[float], Sequence[float]]],
) -> None:
    """The study in one picture: per entry, ASR of the paper's (non-adaptive) attack and of
    the informed (adaptive) attacker; one panel per eps = (eps, before, after)."""
    y = np.arange(len(labels))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4 * len(panels) + 1.5, 0.42 * len(labels) + 1.3), sharey=True
    )
    for ax, (eps, before, after) in zip(np.atleast_1d(axes), panels, strict=True):
        ax.barh(y - 0.2, before, height=0.4, color="#9db4d3", label="paper's attack")
        ax.barh(y + 0.2, after, height=0.4, color="#c0392b", label="informed attacker")
        for yi, v in zip(y + 0.2, after, strict=True):
            ax.text(min(v, 1.0) + 0.01, yi, f"{v:.2f}", va="center", fontsize=7)
        ax.set_xlim(0, 1.12)
        ax.set_title(f"eps = {eps * 255:g}/255", fontsize=9)
        ax.set_xlabel("attack success rate (detectors: joint)")
        ax.grid(axis="x", alpha=0.3)
    first = np.atleast_1d(axes)[0]
    first.set_yticks(y, labels)
    first.invert_yaxis()
    first.legend(fontsize=7, loc="lower right")
    save(fig, path)


def plot_verdict_grid(
    path: Path,
    defences: Sequence[str],
    studies: Sequence[str],
    cells: dict[tuple[int, int], tuple[float, float, str]],
) -> None:
    """A grid study in one picture: per defence (row) and study (column), the adaptive ASR
    minus the undefended victim's (0: no gain left; blue: the defence keeps a gain), with
    the verdict. ``cells[(row, col)] = (adaptive ASR, undefended ASR, verdict)``."""
    gap = np.full((len(defences), len(studies)), np.nan)
    for (r, c), (adaptive, undefended, _) in cells.items():
        gap[r, c] = adaptive - undefended
    fig, ax = plt.subplots(
        figsize=(2.1 * len(studies) + 2.5, 0.5 * len(defences) + 1.5), squeeze=True
    )
    im = ax.imshow(gap, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    for (r, c), (adaptive, _, verdict) in cells.items():
        ax.text(c, r, f"{verdict}\n{adaptive:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(studies)), studies, rotation=20, ha="right", fontsize=8)
    ax.set_yticks(range(len(defences)), defences, fontsize=8)
    fig.colorbar(im, ax=ax, label="adaptive ASR - undefended ASR")
    save(fig, path)

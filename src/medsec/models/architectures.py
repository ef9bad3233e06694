"""Victim architectures: a small CNN (the CPU default) and ResNets with a downsampling stem.

Every victim takes images in [0, 1] (standardisation lives inside the model, so attacks see
pixels), returns logits, and exposes named intermediate features for detectors:
``forward_features(x) -> (logits, {layer_name: tensor})``. The last named layer is always
``penultimate`` (the 128-d dense layer of Finlayson et al.'s victim, followed by dropout).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from medsec.errors import MedsecError

PENULTIMATE_DIM = 128


class Victim(nn.Module):
    """Base: normalisation, a feature trunk of named stages, a dense head with dropout."""

    stage_names: tuple[str, ...]

    def __init__(self, in_channels: int, num_classes: int, trunk_dim: int, dropout: float) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.dense = nn.Sequential(nn.Linear(2 * trunk_dim, PENULTIMATE_DIM), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(PENULTIMATE_DIM, num_classes)

    def stages(self) -> list[nn.Module]:
        raise NotImplementedError

    def _check(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise MedsecError(
                f"model expects (N, {self.in_channels}, H, W) images, got {tuple(x.shape)}"
            )

    def forward_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits plus every named stage's output (pooled trunk and penultimate included)."""
        self._check(x)
        feats: dict[str, Tensor] = {}
        h = _standardise(x)
        for name, stage in zip(self.stage_names, self.stages(), strict=True):
            h = stage(h)
            feats[name] = h
        pen = self.dense(_pool(h))
        feats["penultimate"] = pen
        return self.classifier(self.dropout(pen)), feats

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        h = _standardise(x)
        for stage in self.stages():
            h = stage(h)
        return self.classifier(self.dropout(self.dense(_pool(h))))

    @property
    def feature_names(self) -> tuple[str, ...]:
        return (*self.stage_names, "penultimate")


def _standardise(x: Tensor) -> Tensor:
    """Per-image, per-channel standardisation (inside the model, so attacks see pixels).

    The embedded data vary strongly in gamma, contrast and colour; without this a small CNN
    does not find a small finding within 15 epochs (measured: 50% vs 97% val accuracy).
    """
    return nn.functional.instance_norm(x, eps=1e-3)


def _pool(h: Tensor) -> Tensor:
    """Global average AND max pooling: a small local finding survives the max branch."""
    return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)


def _conv_bn(cin: int, cout: int, stride: int = 1, k: int = 3) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(Victim):
    """Four conv stages, each but the last downsampling by a strided conv; ~0.1 M parameters.

    Sized for CPUs: strided convs instead of conv + max-pool make one PGD step on a 64x64
    image cost ~0.3 ms on two cores (3x less than the pooled variant).
    """

    stage_names = ("stage1", "stage2", "stage3", "stage4")

    def __init__(
        self, in_channels: int = 1, num_classes: int = 2, width: int = 16, dropout: float = 0.2
    ) -> None:
        super().__init__(in_channels, num_classes, 4 * width, dropout)
        w = width
        self.stage1 = nn.Sequential(*_conv_bn(in_channels, w, stride=2, k=5))
        self.stage2 = nn.Sequential(*_conv_bn(w, 2 * w, stride=2))
        self.stage3 = nn.Sequential(*_conv_bn(2 * w, 4 * w, stride=2))
        self.stage4 = nn.Sequential(*_conv_bn(4 * w, 4 * w))

    def stages(self) -> list[nn.Module]:
        return [self.stage1, self.stage2, self.stage3, self.stage4]


class BasicBlock(nn.Module):
    """The ResNet basic block (two 3x3 convs, identity or 1x1 projection shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(Victim):
    """ResNet (basic blocks) with a stem that downsamples 2x for inputs >= 64 px, 4x at 224."""

    stage_names = ("stem", "layer1", "layer2", "layer3", "layer4")

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        width: int = 64,
        image_size: int = 64,
        dropout: float = 0.2,
    ) -> None:
        super().__init__(in_channels, num_classes, 8 * width, dropout)
        stem: list[nn.Module] = _conv_bn(in_channels, width, stride=1 if image_size < 64 else 2)
        if image_size >= 224:
            stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            layers.append(
                nn.Sequential(
                    *[
                        BasicBlock(cin if j == 0 else cout, cout, 2 if (j == 0 and i > 0) else 1)
                        for j in range(n)
                    ]
                )
            )
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def stages(self) -> list[nn.Module]:
        return [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]


_REGISTRY: dict[str, Callable[..., Victim]] = {
    "small-cnn": SmallCNN,
    "resnet18": lambda **kw: ResNet(blocks=(2, 2, 2, 2), width=64, **kw),
    "resnet-mini": lambda **kw: ResNet(blocks=(1, 1, 1, 1), width=16, **kw),
}


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(
    name: str, *, in_channels: int, num_classes: int, image_size: int, **kwargs: Any
) -> Victim:
    """Build a victim by registry name (``small-cnn``, ``resnet18``, ``resnet-mini``)."""
    if name not in _REGISTRY:
        raise MedsecError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    if name.startswith("resnet"):
        kwargs["image_size"] = image_size
    return _REGISTRY[name](in_channels=in_channels, num_classes=num_classes, **kwargs)

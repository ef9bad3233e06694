"""Kernelized manifold mapping (Taghanaki et al., CVPR 2019).

A radial-basis mapping layer after a conv block: each spatial position is a C-vector f;
with learnable Psi (C x C, init identity), C centres c_j (rows of a C x C matrix, init
U(0, 1)), betas (C, init 2.0), a kernel W (C x C) and bias b:
h_j = ||Psi (f - c_j)||, out = exp(-beta * h) W + b. The mapped features are concatenated
with the conv features before the next conv. The network is trained end to end.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from medsec.data.base import Dataset
from medsec.defences import BuildEnv, Defence, Deployed, register_defence
from medsec.defences.robust.common import RobustTrainConfig, fit, paper_grid, train_config, trained
from medsec.models.architectures import SmallCNN, Victim


class KernelMapping(nn.Module):
    """The RBF mapping of one conv map, position by position (see module docstring)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels
        self.psi = nn.Parameter(torch.eye(c))
        self.centres = nn.Parameter(torch.rand(c, c))
        self.beta = nn.Parameter(torch.full((c,), 2.0))
        self.weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(c, c)))
        self.bias = nn.Parameter(torch.zeros(c))

    def kernel(self, f: Tensor) -> Tensor:
        """exp(-beta * h) per position: (B, C, H, W) -> (B, H, W, C), values in (0, 1]."""
        z = f.permute(0, 2, 3, 1) @ self.psi.T  # Psi f
        zc = self.centres @ self.psi.T  # Psi c_j, one row per centre
        d2 = (z * z).sum(-1, keepdim=True) - 2 * z @ zc.T + (zc * zc).sum(-1)
        h = (d2.clamp_min(0) + 1e-6).sqrt()
        return torch.exp(-self.beta * h)

    def forward(self, f: Tensor) -> Tensor:
        return (self.kernel(f) @ self.weight + self.bias).permute(0, 3, 1, 2)


class MapConcat(nn.Module):
    """Conv features with their kernel mapping appended along the channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mapping = KernelMapping(channels)

    def forward(self, f: Tensor) -> Tensor:
        return torch.cat([f, self.mapping(f)], 1)


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class KMMNet(Victim):
    """The small CNN with kernel mapping layers after stage2 and stage3 (concat before conv)."""

    stage_names = ("stage1", "stage2", "kmm2", "stage3", "kmm3", "stage4")

    def __init__(
        self, in_channels: int = 1, num_classes: int = 2, width: int = 16, dropout: float = 0.2
    ) -> None:
        super().__init__(in_channels, num_classes, 4 * width, dropout)
        w = width
        self.stage1 = nn.Sequential(
            nn.Conv2d(in_channels, w, 5, 2, 2, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)
        )
        self.stage2 = _conv_bn(w, 2 * w, 2)
        self.kmm2 = MapConcat(2 * w)
        self.stage3 = _conv_bn(4 * w, 4 * w, 2)
        self.kmm3 = MapConcat(4 * w)
        self.stage4 = _conv_bn(8 * w, 4 * w, 1)

    def stages(self) -> list[nn.Module]:
        return [self.stage1, self.stage2, self.kmm2, self.stage3, self.kmm3, self.stage4]

    def mappings(self) -> list[KernelMapping]:
        return [self.kmm2.mapping, self.kmm3.mapping]

    @classmethod
    def from_victim(cls, victim: nn.Module, seed: int = 0) -> KMMNet:
        """A KMMNet computing exactly what a SmallCNN victim computes until trained."""
        if not isinstance(victim, SmallCNN):
            raise TypeError("KMMNet.from_victim needs a small-cnn victim")
        torch.manual_seed(seed)
        width = victim.stage1[0].out_channels
        net = cls(victim.in_channels, victim.num_classes, width, victim.dropout.p)
        src = victim.state_dict()
        dst = net.state_dict()
        for k, v in src.items():
            if k in dst and dst[k].shape == v.shape:
                dst[k] = v.clone()
            elif k in dst:  # a conv after a mapping: original channels first, mapped ones 0
                w = torch.zeros_like(dst[k])
                w[:, : v.shape[1]] = v
                dst[k] = w
        net.load_state_dict(dst)
        return net

    @torch.no_grad()
    def saturation(self, x: Tensor, low: float = 1e-3, high: float = 0.999) -> dict[str, float]:
        """Fraction of kernel outputs exp(-beta h) below ``low`` or above ``high`` per layer.

        A saturated kernel has (almost) no gradient: the classic way this layer masks them.
        """
        was = self.training
        self.eval()
        try:
            _, feats = self.forward_features(x)
        finally:
            self.train(was)
        out: dict[str, float] = {}
        for name, before in (("kmm2", "stage2"), ("kmm3", "stage3")):
            k = getattr(self, name).mapping.kernel(feats[before])
            out[name] = float(((k < low) | (k > high)).float().mean())
        return out


def train_kmm(
    model: KMMNet,
    data: Dataset,
    cfg: RobustTrainConfig,
    *,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Train the whole network end to end on cross-entropy (Adam, as in their demo)."""

    def loss_fn(step: int, xb: Tensor, yb: Tensor) -> Tensor:
        return nn.functional.cross_entropy(model(xb), yb)

    return fit(model, data, cfg, loss_fn, device=device)


@register_defence
class KMM(Defence):
    name = "kmm"
    paper = (
        "Taghanaki, Abhishek, Azizi, Hamarneh: A kernelized manifold mapping to diminish the "
        "effect of adversarial perturbations, CVPR 2019"
    )
    summary = "kernelized manifold mapping layers"
    assumptions = (
        "the victim's small CNN with one mapping layer after stage2 and one after stage3 (so "
        "stage3 and stage4 take 2C input channels)",
        "the concatenated half of those convs starts at zero and every other weight at the "
        "victim's, then all is fine-tuned end to end with Adam for 3 epochs (a CPU budget "
        "instead of training from scratch); W starts Xavier-uniform, b at zero",
    )
    working_eps = 0.5 / 255

    def build(self, victim: nn.Module, data: Dataset, env: BuildEnv) -> Deployed:
        if isinstance(victim, SmallCNN):
            model = KMMNet.from_victim(victim, seed=env.seed)
            start = "the victim's weights (mapped half of the next convs at zero)"
        else:
            torch.manual_seed(env.seed)
            model = KMMNet(data.channels, data.num_classes)
            start = "scratch (the victim is not a small-cnn)"
        model = model.to(env.device)
        cfg = train_config(env, epochs=3, lr=1e-3)
        rec = trained(
            env, self.name, model, cfg, lambda: train_kmm(model, data, cfg, device=env.device)
        )
        return Deployed(
            model.eval(),
            paper_attacks=paper_grid(env.eps),
            record=rec,
            notes=[f"KMM network trained end to end from {start}."],
            diagnostics=model.saturation,
        )

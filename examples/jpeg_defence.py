"""A user's own defence in one file: JPEG compression before the victim (Das et al. 2017).
Audit it: medsec reproduce --defences none,examples/jpeg_defence.py:JPEGDefence
JPEG runs in PIL, so it has no gradient: medsec's probe finds that and attacks through it
with BPDA (identity backward). Nothing here says how to attack it."""

import io

import numpy as np
import torch
from PIL import Image

from medsec.defences import Defence, Deployed


class JPEG(torch.nn.Module):
    """Encode each image as JPEG at ``quality`` and decode it again (pixels in [0, 1])."""

    def __init__(self, quality: int = 75) -> None:
        super().__init__()
        self.quality = quality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for img in (x.detach().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8):
            buf = io.BytesIO()
            Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(
                buf, "JPEG", quality=self.quality
            )
            out.append(np.asarray(Image.open(buf), dtype=np.float32).reshape(img.shape) / 255)
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.device)


class JPEGDefence(Defence):
    name = "jpeg-75"
    paper = "Das et al.: Keeping the bad guys out: protecting DNNs with JPEG compression, 2017"
    assumptions = ("JPEG quality 75, applied to the stored 8-bit pixels",)
    working_eps = 2 / 255

    def build(self, victim, data, env):
        return Deployed(victim, preprocess=JPEG(75))

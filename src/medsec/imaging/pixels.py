"""The one path from DICOM pixels to model input, shared by training, the study and the service.

Decoding goes through pydicom's pixel handlers (compressed syntaxes via the pylibjpeg,
pylibjpeg-libjpeg, pylibjpeg-openjpeg and pylibjpeg-rle plugins; YBR is returned as RGB), the
Modality LUT and VOI LUT / windowing are pydicom's own functions, MONOCHROME1 is inverted so
bright means dense everywhere. How stored values become [0, 1] is the model's
:class:`InputContract`, saved in its checkpoint, so the service feeds a model exactly what it
was trained on:

- ``stored``: the stored value range (0..2**BitsStored-1, or the signed range), no LUTs - what
  medsec's own 8-bit secondary captures hold (value / 255);
- ``voi-minmax``: Modality LUT, then the file's VOI LUT or window, then per-image min-max;
- ``window``: Modality LUT, then one fixed window (center, width in modality units, e.g. HU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medsec.errors import MedsecError

if TYPE_CHECKING:  # pydicom is imported where pixels are read, not by every data loader
    from pydicom.dataset import Dataset

INTENSITIES = ("stored", "voi-minmax", "window")
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# Colour models pydicom hands back as RGB (YBR_FULL/_422 converted, RCT/ICT by the decoder).
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")
_LUMA = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)  # skimage's rgb2gray weights
_WINDOW_OUT = 65535.0  # output range of the fixed window (a 16-bit unsigned view)


@dataclass(frozen=True)
class InputContract:
    """What a model takes: channels, a square size, and how stored values become [0, 1]."""

    channels: int
    size: int
    intensity: str = "stored"
    window: tuple[float, float] | None = None  # (center, width) for intensity "window"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3) or self.size <= 0:
            raise MedsecError(f"input contract: {self.channels} channel(s) of {self.size} px")
        if self.intensity not in INTENSITIES:
            raise MedsecError(
                f"input contract: intensity {self.intensity!r} is not one of "
                + ", ".join(INTENSITIES)
            )
        if (self.intensity == "window") != (self.window is not None):
            raise MedsecError("input contract: a window goes with intensity 'window', only")
        if self.window is not None and float(self.window[1]) < 1:
            raise MedsecError(f"input contract: window width {self.window[1]} is below 1")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, as stored in a checkpoint's meta under ``input``."""
        out = asdict(self)
        out["window"] = list(self.window) if self.window is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputContract:
        """Parse :meth:`to_dict`'s form; a malformed contract is a MedsecError."""
        try:
            window = data.get("window")
            return cls(
                channels=int(data["channels"]),
                size=int(data["size"]),
                intensity=str(data.get("intensity", "stored")),
                window=(float(window[0]), float(window[1])) if window is not None else None,
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise MedsecError(f"input contract is malformed ({exc!r})") from exc

    @classmethod
    def from_checkpoint_meta(cls, meta: dict[str, Any]) -> InputContract:
        """The contract a checkpoint records; older checkpoints had only ``stored`` inputs."""
        if meta.get("input") is not None:
            contract = cls.from_dict(meta["input"])
            if (contract.channels, contract.size) != (meta["in_channels"], meta["image_size"]):
                raise MedsecError("checkpoint input contract disagrees with its model shape")
            return contract
        return cls(channels=int(meta["in_channels"]), size=int(meta["image_size"]))


def _decode(ds: Dataset) -> np.ndarray:
    """One frame through pydicom's handlers; any decoder failure is one MedsecError line."""
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames != 1:
        raise MedsecError(f"multi-frame image ({frames} frames); one 2-D image expected")
    try:
        return ds.pixel_array
    except Exception as exc:  # handlers raise many types (missing plugin, corrupt stream...)
        raise MedsecError(f"cannot decode pixel data ({type(exc).__name__}: {exc})") from exc


def _stored_range(ds: Dataset) -> tuple[float, float]:
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """pydicom's LINEAR windowing onto a 16-bit unsigned view, scaled to [0, 1]."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_windowing

    view = Dataset()
    view.PhotometricInterpretation = "MONOCHROME2"
    view.BitsStored = 16
    view.PixelRepresentation = 0
    view.WindowCenter = f"{center:.6g}"
    view.WindowWidth = f"{width:.6g}"
    view.VOILUTFunction = "LINEAR"
    return apply_windowing(values, view) / _WINDOW_OUT


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _grey(
    ds: Dataset, a: np.ndarray, intensity: str, window: tuple[float, float] | None
) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if intensity == "stored":
        lo, hi = _stored_range(ds)
        x = (a.astype(np.float64) - lo) / (hi - lo)
    else:
        values = np.asarray(apply_modality_lut(a, ds), dtype=np.float64)
        if window is not None:
            x = _window(values, *window)
        else:
            windowed = apply_voi_lut(values, ds)
            # A window far outside the data (seen in real files) flattens the image: skip it.
            x = _minmax(np.asarray(windowed if np.ptp(windowed) > 0 else values, np.float64))
    x = np.clip(x, 0.0, 1.0)
    return 1.0 - x if ds.PhotometricInterpretation == "MONOCHROME1" else x


def dicom_image(
    ds: Dataset, intensity: str = "stored", window: tuple[float, float] | None = None
) -> np.ndarray:
    """One DICOM image as CHW float32 in [0, 1] at its own size (C = 1 grey, 3 RGB).

    Raises MedsecError (one line) for what cannot become an image: several frames, an
    unsupported photometric interpretation, undecodable pixel data, a window on colour.
    """
    if intensity not in INTENSITIES:
        raise MedsecError(f"intensity {intensity!r} is not one of {', '.join(INTENSITIES)}")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    samples = int(ds.get("SamplesPerPixel", 1))
    if not (samples == 1 and photometric in MONOCHROME) and not (
        samples == 3 and photometric in COLOUR
    ):
        raise MedsecError(f"unsupported photometric interpretation {photometric!r}/{samples}")
    a = _decode(ds)
    if a.shape[:2] != (int(ds.Rows), int(ds.Columns)) or a.ndim != (2 if samples == 1 else 3):
        raise MedsecError(f"decoded pixel array of shape {a.shape}; expected one 2-D image")
    try:
        if samples == 1:
            x = _grey(ds, a, intensity, window)
            return np.ascontiguousarray(x[None], dtype=np.float32)
        if intensity == "window":
            raise MedsecError("a fixed window applies to grey images only; this one is RGB")
        lo, hi = _stored_range(ds)
        rgb = _minmax(a.astype(np.float64)) if intensity == "voi-minmax" else (a - lo) / (hi - lo)
        return np.ascontiguousarray(np.clip(rgb, 0, 1).transpose(2, 0, 1), dtype=np.float32)
    except (ValueError, TypeError, AttributeError, IndexError) as exc:  # bad LUT/window values
        raise MedsecError(f"cannot apply the image's LUTs ({exc})") from exc


def match_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """CHW with ``channels`` channels: grey repeated to RGB, RGB to luma."""
    if image.shape[0] == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=0)
    return np.tensordot(_LUMA, image, axes=1)[None].astype(np.float32)


def resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """Area-style resize of a float NCHW batch to size x size (no-op when already that size)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(images))
    antialias = images.shape[-1] > size
    out = F.interpolate(
        t, size=(size, size), mode="bilinear", antialias=antialias, align_corners=False
    )
    return out.clamp_(0, 1).numpy()


def fit_image(image: np.ndarray, contract: InputContract) -> np.ndarray:
    """A CHW image from :func:`dicom_image` at the contract's channels and size."""
    return resize_batch(match_channels(image, contract.channels)[None], contract.size)[0]

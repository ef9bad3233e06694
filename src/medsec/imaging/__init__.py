"""Imaging primitives shared by data loaders, models and the service (a low layer).

:mod:`medsec.imaging.pixels` is the one path from DICOM pixels to model input.
"""

from medsec.imaging.pixels import InputContract, dicom_image, fit_image, resize_batch

__all__ = ["InputContract", "dicom_image", "fit_image", "resize_batch"]

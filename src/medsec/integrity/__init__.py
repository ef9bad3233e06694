"""Signed images: DICOM PS3.15 signatures (interoperable with DCMTK) and signed manifests.

Public API used by the study and the command line::

    key, cert = generate_signer(out_dir)
    ds = image_to_dicom(image, seed=0)
    sign_dataset(ds, key, cert, profile="creator")
    result = verify_dataset(ds, TrustStore.from_dir(trust_dir))
    result.ok, result.reason
"""

from medsec.integrity.dicom_signature import (
    SignatureCheck,
    Status,
    VerificationResult,
    sign_dataset,
    sign_file,
)
from medsec.integrity.dicom_verify import verify_dataset
from medsec.integrity.keys import TrustStore, generate_ca, generate_signer, issue_signer
from medsec.integrity.secondary_capture import dicom_to_image, image_to_dicom

__all__ = [
    "SignatureCheck",
    "Status",
    "TrustStore",
    "VerificationResult",
    "dicom_to_image",
    "generate_ca",
    "generate_signer",
    "image_to_dicom",
    "issue_signer",
    "sign_dataset",
    "sign_file",
    "verify_dataset",
]

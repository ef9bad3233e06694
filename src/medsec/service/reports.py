"""Predictions as DICOM: one signed Structured Report per accepted image, kept in a folder.

The report is a TID 1500 Measurement Report (highdicom's Comprehensive 3D SR): one image-level
measurement group referencing the source instance (its study, series and SOP instance UIDs),
the predicted class as a qualitative evaluation and each class probability as a number, with
the model named as the algorithm (architecture, SHA-256 of the weights). It is flagged
PRELIMINARY (nobody has verified it) and signed by the service's own key, so a PACS or a
viewer can check who wrote it; an EC (P-256) key signs in milliseconds, an RSA key costs a
slow key load per report. Codes without a standard equivalent use the local scheme 99MEDSEC.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from medsec.errors import MedsecError
from medsec.integrity import sign_dataset
from medsec.integrity.dicom_signature import dataset_bytes, write_new
from medsec.integrity.keys import load_certificate, load_private_key

SCHEME = "99MEDSEC"


def _concept(value: str, meaning: str) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value, SCHEME, meaning)


def build_report(source: Dataset, prediction: dict[str, Any], arch: str, model_sha: str) -> Dataset:
    """An unsigned SR of ``prediction`` (label, probabilities) about ``source``."""
    import highdicom as hd
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid="2.25." + str(int(model_sha[:32], 16)), name="medsec", model_name=arch
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device
    )
    label = int(prediction["label"])
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="medsec"),
        algorithm_id=hd.sr.AlgorithmIdentification(name=f"medsec {arch}", version=model_sha),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=_concept("PREDICTED", "Predicted class"),
                value=_concept(f"CLASS{label}", f"class {label}"),
            )
        ],
        measurements=[
            hd.sr.Measurement(
                name=_concept(f"P{i}", f"Probability of class {i}"),
                value=float(p),
                unit=CodedConcept("1", "UCUM", "no units"),
            )
            for i, p in enumerate(prediction["probabilities"])
        ],
    )
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=[group],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=content,
        series_instance_uid=generate_uid(),
        series_number=1,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="medsec",
        is_complete=True,
    )


@dataclass(frozen=True)
class ReportWriter:
    """Writes signed SRs into ``out_dir`` as ``<SR SOP Instance UID>.dcm`` (never overwrites)."""

    out_dir: Path
    key: Path
    cert: Path
    arch: str
    model_sha256: str

    def check(self) -> None:
        """At start-up: the key and certificate load and the folder is writable."""
        try:
            load_private_key(self.key)
            load_certificate(self.cert)
        except MedsecError as exc:
            raise MedsecError(f"[results] signing key/certificate unusable: {exc}") from exc
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            probe = self.out_dir / ".medsec-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise MedsecError(f"[results] dir {self.out_dir} is not writable ({exc})") from exc

    def write(self, source: Dataset, prediction: dict[str, Any]) -> dict[str, str]:
        """Build, sign and store the SR; returns its UID, file name and SHA-256 (audited)."""
        report = build_report(source, prediction, self.arch, self.model_sha256)
        sign_dataset(report, self.key, self.cert, profile="none")
        data = dataset_bytes(report)
        name = f"{report.SOPInstanceUID}.dcm"
        write_new(self.out_dir / name, data)
        return {
            "sop_instance_uid": str(report.SOPInstanceUID),
            "file": name,
            "sha256": hashlib.sha256(data).hexdigest(),
        }

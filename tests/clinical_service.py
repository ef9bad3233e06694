"""Shared by the clinical DICOM tests: real test files, a service that takes them, a counting model.

Not a test module: ``test_clinical_dicom``, ``test_dicomweb`` and ``test_dimse`` import it.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import torch
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from medsec.data.base import Dataset as Images
from medsec.data.dicom import load_dicom_csv
from medsec.integrity import generate_signer, sign_dataset
from medsec.integrity.dicom_signature import dataset_bytes
from medsec.models import create_model, load_checkpoint, save_checkpoint
from medsec.service.app import ServiceState
from medsec.service.bootstrap import init_service_dir
from medsec.service.config import load_config
from medsec.service.server import build_state, make_server

SIZE = 64
# name -> (modality, transfer syntax keyword): every file the service must accept.
CLINICAL = {
    "RG1_UNCI.dcm": ("CR", "ExplicitVRLittleEndian"),  # 15-bit MONOCHROME1
    "CT_small.dcm": ("CT", "ExplicitVRLittleEndian"),  # 16-bit signed, rescale
    "MR_small.dcm": ("MR", "ExplicitVRLittleEndian"),
    "JPEG-LL.dcm": ("NM", "JPEGLosslessSV1"),
    "JPEG2000.dcm": ("NM", "JPEG2000"),
    "MR_small_RLE.dcm": ("MR", "RLELossless"),
}


def read(name: str) -> Dataset:
    """A pydicom / pydicom-data test file."""
    return pydicom.dcmread(get_testdata_file(name))


def signed_bytes(name: str, key: Path, cert: Path) -> bytes:
    """A test file signed by medsec (Creator RSA profile, SHA-256), as bytes."""
    return dataset_bytes(sign_dataset(read(name), key, cert, profile="creator"))


def dcmsign_signed(name: str, key: Path, cert: Path, out: Path) -> bytes:
    """A test file signed by DCMTK's dcmsign (Creator RSA profile, SHA-256), as bytes."""
    dcmsign = shutil.which("dcmsign")
    assert dcmsign, "dcmsign (DCMTK) is not installed: run `make sysdeps` (apt-get install dcmtk)"
    cmd = [dcmsign, "--sign", str(key), str(cert), "--profile-creator", "--mac-sha256",
           get_testdata_file(name), str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return out.read_bytes()


class CountingModel(torch.nn.Module):
    """The served model, counting its calls: proves nothing refused reaches it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x)


@dataclass
class Clinical:
    """A clinical service directory and what the dicom: loader made of the same files."""

    config_path: Path
    token: str
    ca: ssl.SSLContext
    key: Path
    cert: Path
    data: Images  # what the dicom: loader made of the same files
    names: list[str]
    model: torch.nn.Module


def make_clinical(root: Path, reports: bool = False) -> Clinical:
    """The dicom: loader's data set of the CLINICAL files, an untrained model whose checkpoint
    records that input contract, and a service directory that takes those modalities; with
    ``reports``, a [results] section and an EC key of the service that signs the SRs."""
    names = list(CLINICAL)
    table = root / "labels.csv"
    rows = [f"{get_testdata_file(n)},{i % 2},{s}" for s in ("train", "test") for i, n in
            enumerate(names)]  # fmt: skip
    table.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    data = load_dicom_csv(str(table), size=SIZE, val_fraction=0.0)
    torch.manual_seed(0)
    model = create_model("small-cnn", in_channels=1, num_classes=2, image_size=SIZE).eval()
    save_checkpoint(
        root / "victim.pt", model, arch="small-cnn", data_hash=data.content_hash,
        image_size=SIZE, metrics={}, settings={}, input_contract=data.provenance["input"],
    )  # fmt: skip
    assert load_checkpoint(root / "victim.pt")[1]["input"]["intensity"] == "voi-minmax"
    result = init_service_dir(root / "svc", root / "victim.pt", port=0, client="pacs")
    text = result.config.read_text()
    text = text.replace("max_body_bytes = 1048576", "max_body_bytes = 16777216")
    text = text.replace('modalities = ["OT"]', 'modalities = ["CR", "CT", "MR", "NM"]')
    text = text.replace("resize = false", "resize = true")
    if reports:
        key, cert = generate_signer(root / "report_signer", "medsec service", "ec")
        text += f'\n[results]\ndir = "reports"\nkey = "{key}"\ncert = "{cert}"\n'
    result.config.write_text(text)
    assert result.modality_key is not None and result.modality_cert is not None
    return Clinical(
        config_path=result.config,
        token=result.token,
        ca=ssl.create_default_context(cafile=str(result.ca_cert)),
        key=result.modality_key,
        cert=result.modality_cert,
        data=data,
        names=names,
        model=model,
    )


@contextmanager
def serving(clinical: Clinical) -> Iterator[tuple[httpx.Client, ServiceState, CountingModel]]:
    """The real service (uvicorn, TLS) in a thread, its model counting calls; a client."""
    state = build_state(load_config(clinical.config_path))
    counting = CountingModel(state.model)
    state.model = counting  # type: ignore[assignment]
    server = make_server(state, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"https://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, verify=clinical.ca, timeout=60) as client:
            yield client, state, counting
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        state.audit.close()

"""DICOM C-STORE ingest: a Storage SCP (pynetdicom) in front of the same gate as HTTP.

Each instance is checked on the bytes as received - pynetdicom's encoded dataset, undecoded,
behind the file meta it builds from the negotiated transfer syntax (file meta is never signed)
- before anything else: signature, then pixels, then the model. A refused instance gets a
C-STORE failure status whose Error Comment carries the reason (cut to the 64 characters an LO
holds; the audit line keeps it whole) and never reaches the model. Accepted instances are
classified and the verdict audited; nothing is stored. Associations not addressed to our AE
title, or (when configured) from an unknown calling AE title, are rejected and audited too.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from medsec.errors import MedsecError
from medsec.service.app import ServiceState, accepted_fields, refused_fields
from medsec.service.config import DimseSection, ServiceConfig
from medsec.service.gate import PROCESSING_FAILURE, Refusal, dicom_status

log = logging.getLogger("medsec.service.dimse")

SUCCESS = 0x0000
_COMMENT_MAX = 64  # Error Comment (0000,0902) is an LO
_SLACK = 1 << 16  # command set and PDU headers on top of the instance's own bytes
_P_DATA_TF = b"\x04"


def _status(code: int, comment: str | None = None) -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment.replace("\\", "/")[:_COMMENT_MAX]
    return status


def ssl_context(config: ServiceConfig) -> ssl.SSLContext:
    """Server-side TLS (1.2+) from the [tls] files; client certificates required with a CA."""
    tls = config.tls
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
        if tls.client_ca is not None:
            ctx.load_verify_locations(tls.client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise MedsecError(f"DICOM TLS material unusable ({exc})") from exc
    return ctx


class StorageSCP:
    """The DICOM listener of ``medsec serve``; :meth:`start` binds, :meth:`stop` closes."""

    def __init__(
        self, state: ServiceState, dimse: DimseSection, max_bytes: int | None = None
    ) -> None:
        """``max_bytes`` (default ``max_body_bytes``) caps one instance, checked as it arrives."""
        self.state, self.dimse = state, dimse
        self.max_bytes = max_bytes or state.config.server.max_body_bytes
        self._server: ThreadedAssociationServer | None = None
        self._received: dict[int, int] = {}  # P-DATA bytes since an association's last C-STORE
        self._lock = threading.Lock()
        self.ae = AE(ae_title=dimse.ae_title)
        for context in StoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self.ae.require_called_aet = True
        self.ae.require_calling_aet = list(dimse.calling_ae_titles)

    def start(self) -> tuple[str, int]:
        """Listen in background threads; returns the bound (host, port)."""
        ctx = ssl_context(self.state.config) if self.dimse.tls else None
        host = self.dimse.host or self.state.config.server.host
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_DATA_RECV, self._on_data),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
        try:
            self._server = self.ae.start_server(
                (host, self.dimse.port),
                block=False,
                evt_handlers=handlers,  # type: ignore[arg-type]
                ssl_context=ctx,
            )
        except OSError as exc:
            raise MedsecError(
                f"DICOM listener cannot bind {host}:{self.dimse.port} ({exc})"
            ) from exc
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        """Close the listener and its associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _record(self, event: Event) -> dict[str, Any]:
        requestor = event.assoc.requestor
        return {
            "channel": "dimse",
            "client": f"dimse:{requestor.ae_title}",
            "remote": requestor.address,
            "sop_instance_uid": None,
            "verification": None,
            "prediction": None,
            "model_sha256": self.state.model_meta["file_sha256"],
        }

    def _on_rejected(self, event: Event) -> None:
        record = self._record(event)
        called = event.assoc.requestor.primitive.called_ae_title
        record.update(status=None, code="association_rejected", ms=0.0)
        record["reason"] = (
            f"association from {record['client']} to {called!r} rejected "
            "(calling AE title not allowed, or called AE title not ours)"
        )
        try:
            self.state.audit.append(record)
        except Exception:  # the rejection stands either way; the log says why it is missing
            log.exception("audit of a rejected association failed")

    def _on_data(self, event: Event) -> None:
        """Abort an association whose instance outgrows ``max_bytes`` while it arrives:
        pynetdicom would otherwise buffer all of it before :meth:`_on_store` could refuse it."""
        if event.data[:1] != _P_DATA_TF:
            return
        key = id(event.assoc)
        with self._lock:
            received = self._received.get(key, 0) + len(event.data)
            self._received[key] = received
            over = self.max_bytes + _SLACK < received < (1 << 62)
            if over:
                self._received[key] = 1 << 62  # abort once
        if not over:
            return
        record = self._record(event)
        record.update(status=None, code="too_large", ms=0.0)
        record["reason"] = f"instance exceeds {self.max_bytes} bytes; association aborted"
        try:
            self.state.audit.append(record)
        except Exception:  # the abort stands either way
            log.exception("audit of an aborted association failed")
        # abort() waits for the reader thread, which is the one running this handler
        threading.Thread(target=event.assoc.abort, daemon=True).start()

    def _on_close(self, event: Event) -> None:
        with self._lock:
            self._received.pop(id(event.assoc), None)

    def _on_store(self, event: Event) -> Dataset:
        started = time.perf_counter()
        record = self._record(event)
        status = SUCCESS
        with self._lock:
            self._received[id(event.assoc)] = 0  # the instance is in; count the next one
        try:
            body = event.encoded_dataset()
            if len(body) > self.max_bytes:
                raise Refusal(
                    413, "too_large", f"instance of {len(body)} bytes exceeds {self.max_bytes}"
                )
            checked, prediction = self.state.predict(body)
            record.update(accepted_fields(checked, prediction))
        except Refusal as refusal:
            status = dicom_status(refusal)
            record.update(refused_fields(refusal))
        except Exception:  # a bug: logged with its traceback, a generic status to the sender
            log.exception("C-STORE failed")
            status = PROCESSING_FAILURE
            record.update(code="internal", reason="internal error; see the service log")
        record.update(status=status, ms=round((time.perf_counter() - started) * 1000, 3))
        try:
            self.state.audit.append(record)
        except Exception:  # no verdict leaves unaudited
            log.exception("audit write failed")
            return _status(PROCESSING_FAILURE, "audit write failed")
        return _status(
            status, None if status == SUCCESS else f"{record['code']}: {record['reason']}"
        )

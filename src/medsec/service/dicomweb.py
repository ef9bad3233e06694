"""DICOMweb STOW-RS ingest (PS3.18 10.5): ``POST /dicomweb/studies``, the same gate as HTTP.

The request is ``multipart/related; type="application/dicom"`` with one DICOM Part 10 instance
per part and the bearer token of ``/v1/predict``. Each instance goes through the gate on its
bytes as received (signature before any decoding), accepted ones are classified, and every
instance gets its own audit line. The answer is the standard store response in DICOM JSON:
ReferencedSOPSequence for stored (here: verified and classified) instances, FailedSOPSequence
with a Failure Reason for refused ones; 200 when all passed, 202 when some failed, 409 when
none passed. Each referenced item also carries the verdict as private attributes (creator
"MEDSEC"): label, probabilities and the UID of the signed SR report when [results] is set.
Images are not kept, so no RetrieveURL is given.
"""

from __future__ import annotations

import email.policy
import time
from email.message import Message
from email.parser import BytesHeaderParser
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from medsec.service.app import ServiceState, accepted_fields, admit, read_body, refused_fields
from medsec.service.gate import PROCESSING_FAILURE, Refusal, dicom_status

DICOM_JSON = "application/dicom+json"
PRIVATE_CREATOR = "MEDSEC"
_HEADERS = BytesHeaderParser(policy=email.policy.HTTP)


def _content_type(value: str) -> Message:
    """A Content-Type header parsed by the standard library (parameters, quoting)."""
    return _HEADERS.parsebytes(f"Content-Type: {value}\r\n\r\n".encode("latin-1"))


def split_related(body: bytes, boundary: str) -> list[tuple[str, bytes]]:
    """(content type, bytes) of each part of a multipart body (RFC 2046 5.1.1).

    Written here because the standard library's email parser works line by line, about
    0.1 s per MB of pixel data; this finds the delimiters with bytes.find and slices once.
    """
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    if body.startswith(delimiter[2:]):
        body = b"\r\n" + body
    pos = body.find(delimiter)
    if not boundary or pos < 0:
        raise Refusal(400, "bad_multipart", "no multipart boundary in the body")
    parts = []
    while True:
        pos += len(delimiter)
        if body[pos : pos + 2] == b"--":
            return parts
        line_end = body.find(b"\r\n", pos)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise Refusal(400, "bad_multipart", "malformed multipart delimiter line")
        end = body.find(delimiter, line_end)
        if end < 0:
            raise Refusal(400, "bad_multipart", "multipart body has no closing boundary")
        part = body[line_end + 2 : end]
        if part.startswith(b"\r\n"):  # no headers: the default type, text/plain, is refused
            head, data = b"", part[2:]
        else:
            split = part.find(b"\r\n\r\n")
            if split < 0:
                raise Refusal(400, "bad_multipart", "multipart part without a header block")
            head, data = part[: split + 2], part[split + 4 :]
        parts.append((_HEADERS.parsebytes(head + b"\r\n").get_content_type(), data))
        pos = end


def _uid(vr: str, value: str | int) -> dict[str, Any]:
    return {"vr": vr, "Value": [value]}


def _result(prediction: dict[str, Any]) -> dict[str, Any]:
    """The verdict as private attributes of a referenced item (creator "MEDSEC", group 0009):
    predicted label, class probabilities and, with [results], the signed SR's UID."""
    out = {
        "00090010": {"vr": "LO", "Value": [PRIVATE_CREATOR]},
        "00091001": _uid("US", prediction["label"]),
        "00091002": {"vr": "FD", "Value": prediction["probabilities"]},
    }
    if "report" in prediction:
        out["00091003"] = _uid("UI", prediction["report"]["sop_instance_uid"])
    return out


def _store_response(stored: list[dict[str, Any]], failed: list[dict[str, Any]]) -> dict:
    """PS3.18 Table 10.5.3-1 in DICOM JSON: the referenced and the failed SOP instances."""
    out: dict[str, Any] = {}
    if failed:
        out["00081198"] = {"vr": "SQ", "Value": failed}
    if stored:
        out["00081199"] = {"vr": "SQ", "Value": stored}
    return out


def add_stow_route(app: FastAPI, state: ServiceState) -> None:
    """Mount ``POST /dicomweb/studies`` on ``app`` (auth, limits and audit as /v1/predict)."""
    model_sha = state.model_meta["file_sha256"]

    def record(client: str | None, remote: str | None) -> dict[str, Any]:
        return {
            "channel": "stow",
            "client": client,
            "remote": remote,
            "sop_instance_uid": None,
            "verification": None,
            "prediction": None,
            "model_sha256": model_sha,
        }

    def instance(part: tuple[str, bytes], base: dict[str, Any]) -> tuple[dict, int]:
        """Gate and classify one part; its audit record and DICOM status (0 = accepted)."""
        started, line = time.perf_counter(), dict(base)
        ctype, data = part
        status, cls = 0, ""
        try:
            if ctype != "application/dicom":
                raise Refusal(415, "unsupported_media_type", f"part of type {ctype!r}")
            checked, prediction = state.predict(data)
            cls = checked.sop_class_uid
            line.update(accepted_fields(checked, prediction))
        except Refusal as refusal:
            status, cls = dicom_status(refusal), refusal.sop_class_uid or ""
            line.update(refused_fields(refusal))
        except Exception:  # a bug: the traceback goes to the service log, a status to the caller
            status = PROCESSING_FAILURE
            line.update(code="internal", reason="internal error; see the service log")
        line.update(status=status, ms=round((time.perf_counter() - started) * 1000, 3))
        line["sop_class_uid"] = cls
        return line, status

    @app.post("/dicomweb/studies")
    async def stow(request: Request) -> JSONResponse:
        client = state.auth.client_for(request.headers.get("authorization"))
        remote = request.client.host if request.client else None
        headers: dict[str, str] = {}
        body_read = False
        try:
            admit(state, client, remote, headers)
            ctype = _content_type(request.headers.get("content-type", ""))
            if (
                ctype.get_content_type() != "multipart/related"
                or (ctype.get_param("type") or "application/dicom") != "application/dicom"
            ):
                raise Refusal(
                    415,
                    "unsupported_media_type",
                    'send multipart/related; type="application/dicom"',
                )
            server = state.config.server
            body = await read_body(request, server.max_body_bytes, server.body_timeout_s)
            body_read = True
            parts = split_related(body, str(ctype.get_param("boundary") or ""))
            if not parts:
                raise Refusal(400, "bad_multipart", "multipart body holds no instance")
        except Refusal as refusal:
            line = record(client, remote)
            line.update(
                status=refusal.http_status, code=refusal.code, reason=refusal.reason, ms=0.0
            )
            audit_hash = await run_in_threadpool(state.audit.append, line)
            if refusal.http_status == 401:
                headers["WWW-Authenticate"] = "Bearer"
            if not body_read:  # as /v1/predict: what is left of the body is not read, hang up
                headers["Connection"] = "close"
            payload = {"error": refusal.reason, "code": refusal.code, "audit_hash": audit_hash}
            return JSONResponse(payload, refusal.http_status, headers=headers)

        stored, failed = [], []
        for part in parts:
            line, status = await run_in_threadpool(instance, part, record(client, remote))
            await run_in_threadpool(state.audit.append, line)  # no verdict leaves unaudited
            item = {
                "00081150": _uid("UI", line["sop_class_uid"]),
                "00081155": _uid("UI", line["sop_instance_uid"] or ""),
            }
            if status:
                failed.append({**item, "00081197": _uid("US", status)})
            else:
                stored.append({**item, **_result(line["prediction"])})
        code = 200 if not failed else 202 if stored else 409
        return JSONResponse(_store_response(stored, failed), code, media_type=DICOM_JSON)

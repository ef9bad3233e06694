"""The FastAPI application: authenticate, rate-limit, read, gate, predict, audit, answer.

Endpoints: ``GET /healthz`` (no authentication, says only that the process is up),
``GET /v1/info`` and ``POST /v1/predict`` (bearer token). Every predict request, accepted or
refused, is written to the audit log before the response leaves; if the audit write fails the
request fails (500), so no prediction is ever served unaudited.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from medsec.integrity import VerificationResult
from medsec.models import Victim
from medsec.service.access import Authenticator, RateLimiter
from medsec.service.audit import AuditLog
from medsec.service.config import ImageRules, ServiceConfig
from medsec.service.gate import CheckedImage, ImagePolicy, Refusal, check_upload
from medsec.service.reports import ReportWriter

log = logging.getLogger("medsec.service")
DICOM_TYPES = ("application/dicom", "application/octet-stream")


@dataclass
class ServiceState:
    """What the app needs at run time; built (and verified) by ``medsec.service.server``."""

    config: ServiceConfig
    model: Victim
    model_meta: dict[str, Any]
    policy: ImagePolicy
    auth: Authenticator
    limiter: RateLimiter
    audit: AuditLog
    reports: ReportWriter | None = None  # [results]: a signed DICOM SR per prediction

    def __post_init__(self) -> None:
        self._model_lock = threading.Lock()

    def predict(self, body: bytes) -> tuple[CheckedImage, dict[str, Any]]:
        """Gate then run the model on exactly the gated pixels (one at a time: CPU-bound)."""
        checked = check_upload(body, self.policy)
        with self._model_lock, torch.inference_mode():
            proba = torch.softmax(self.model(checked.tensor), dim=1)[0]
        probs = [round(float(p), 6) for p in proba]
        prediction: dict[str, Any] = {"label": int(proba.argmax()), "probabilities": probs}
        if self.reports is not None and checked.dataset is not None:
            prediction["report"] = self.reports.write(checked.dataset, prediction)
        return checked, prediction


def verification_json(result: VerificationResult | None) -> dict[str, Any] | None:
    """The verdict as the response and the audit line give it (HTTP and DIMSE alike)."""
    if result is None:
        return None
    return {
        "ok": result.ok,
        "status": result.status.name,
        "reason": result.reason,
        "signatures": [
            {"signer": c.signer, "mac": c.mac_algorithm, "uid": c.uid, "creator": c.creator}
            for c in result.signatures
        ],
    }


def accepted_fields(checked: CheckedImage, prediction: dict[str, Any]) -> dict[str, Any]:
    """Audit fields of an accepted instance (C-STORE and STOW-RS alike)."""
    return {
        "sop_instance_uid": checked.sop_instance_uid,
        "verification": verification_json(checked.verification),
        "prediction": prediction,
        "code": "ok",
        "reason": None,
    }


def refused_fields(refusal: Refusal) -> dict[str, Any]:
    """Audit fields of a refused instance (C-STORE and STOW-RS alike)."""
    return {
        "sop_instance_uid": refusal.sop_instance_uid,
        "verification": verification_json(refusal.verification),
        "code": refusal.code,
        "reason": refusal.reason,
    }


def admit(
    state: ServiceState, client: str | None, remote: str | None, headers: dict[str, str]
) -> None:
    """Rate-limit, then authenticate: a Refusal 429 (``Retry-After`` put in ``headers``) or
    401. Unauthenticated callers share a bucket per address, so guessing tokens or flooding
    the audit log is throttled too."""
    wait = state.limiter.acquire(client or f"anonymous@{remote}")
    if client is None and wait is None:
        raise Refusal(401, "unauthorized", "missing or invalid bearer token")
    if wait is not None:
        headers["Retry-After"] = str(max(1, round(wait + 0.5)))
        raise Refusal(429, "rate_limited", f"rate limit exceeded; retry in {wait:.2f} s")


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refusing (413) as soon as it exceeds ``limit`` bytes, (408) when it
    has not all arrived within ``timeout_s``, and (499) when the client hangs up first."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Refusal(400, "bad_request", "Content-Length is not a number")
        if int(declared) > limit:
            raise Refusal(413, "too_large", f"body of {declared} bytes exceeds {limit} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise Refusal(413, "too_large", f"body exceeds {limit} bytes")
                chunks.append(chunk)
    except TimeoutError as exc:
        raise Refusal(408, "timeout", f"request body not received within {timeout_s:g} s") from exc
    except ClientDisconnect as exc:  # nginx's 499: nobody will read the answer, the audit will
        raise Refusal(499, "client_closed", "client closed the connection mid-body") from exc
    return b"".join(chunks)


def _error(status: int, code: str, reason: str, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": reason, "code": code, **extra}, status, headers=headers)


def create_app(state: ServiceState) -> FastAPI:
    """The ASGI app; no interactive docs or schema endpoints (nothing unauthenticated)."""
    app = FastAPI(title="medsec", docs_url=None, redoc_url=None, openapi_url=None)
    model_sha = state.model_meta["file_sha256"]

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "http", str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "bad_request", f"malformed request ({len(exc.errors())} error(s))")

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error", exc_info=exc)
        return _error(500, "internal", "internal error; the service log has the details")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/info")
    async def info(request: Request) -> JSONResponse:
        client = state.auth.client_for(request.headers.get("authorization"))
        if client is None:
            return _error(401, "unauthorized", "missing or invalid bearer token")
        p = state.policy
        return JSONResponse(
            {
                "client": client,
                "model": {
                    "arch": state.model_meta["arch"],
                    "file_sha256": model_sha,
                    "image_size": p.image_size,
                    "channels": p.channels,
                    "input": p.contract.to_dict(),
                },
                "policy": {
                    **p.rules.model_dump(mode="json", include=set(ImageRules.model_fields)),
                    "max_body_bytes": state.config.server.max_body_bytes,
                    "max_inflated_bytes": p.max_inflated_bytes,
                },
            }
        )

    @app.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        started = time.perf_counter()
        client = state.auth.client_for(request.headers.get("authorization"))
        record: dict[str, Any] = {
            "client": client,
            "remote": request.client.host if request.client else None,
            "sop_instance_uid": None,
            "verification": None,
            "prediction": None,
            "model_sha256": model_sha,
        }
        headers: dict[str, str] = {}
        body_read = False
        try:
            admit(state, client, record["remote"], headers)
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype not in DICOM_TYPES:
                raise Refusal(
                    415, "unsupported_media_type",
                    f"Content-Type {ctype or 'absent'!r}; send application/dicom",
                )  # fmt: skip
            server = state.config.server
            body = await read_body(request, server.max_body_bytes, server.body_timeout_s)
            body_read = True
            checked, prediction = await run_in_threadpool(state.predict, body)
            verification = verification_json(checked.verification)
            record.update(
                sop_instance_uid=checked.sop_instance_uid,
                verification=verification,
                prediction=prediction,
            )
            status, payload = (
                200,
                {
                    "sop_instance_uid": checked.sop_instance_uid,
                    "prediction": prediction,
                    "verification": verification,
                    "resized": checked.resized,
                    "model_sha256": model_sha,
                },
            )
        except Refusal as refusal:
            record["verification"] = verification_json(refusal.verification)
            status = refusal.http_status
            payload = {"error": refusal.reason, "code": refusal.code}
            if refusal.verification is not None:
                payload["verification"] = record["verification"]
            record["sop_instance_uid"] = refusal.sop_instance_uid
        except Exception:  # a bug: logged with its traceback here, one line to the client
            log.exception("predict failed")
            status = 500
            payload = {
                "error": "internal error; the service log has the details",
                "code": "internal",
            }
        record.update(
            status=status,
            code=payload.get("code", "ok"),
            reason=payload.get("error"),
            ms=round((time.perf_counter() - started) * 1000, 3),
        )
        payload["audit_hash"] = await run_in_threadpool(state.audit.append, record)
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if not body_read:  # whatever is left of the body is not worth reading: hang up
            headers["Connection"] = "close"
        return JSONResponse(payload, status, headers=headers)

    return app

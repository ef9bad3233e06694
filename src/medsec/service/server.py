"""Start-up: check everything before listening, then run uvicorn with TLS.

The order matters: config, TLS material, trust stores, the model's signature and hash, the
audit log's chain. Any failure is one MedsecError line and a non-zero exit; the port is only
opened once all of it holds.
"""

from __future__ import annotations

import ssl

import torch
import uvicorn

from medsec.errors import MedsecError
from medsec.imaging.pixels import InputContract
from medsec.integrity import TrustStore
from medsec.service.access import Authenticator, RateLimiter
from medsec.service.app import ServiceState, create_app
from medsec.service.audit import AuditLog
from medsec.service.config import ServiceConfig
from medsec.service.dicomweb import add_stow_route
from medsec.service.gate import ImagePolicy
from medsec.service.model_integrity import load_verified_model
from medsec.service.reports import ReportWriter
from medsec.service.transport import GuardedServer, guarded


def _check_tls(config: ServiceConfig) -> None:
    """Load the certificate, key and client CA once so a bad file is a clear error, not a trace."""
    tls = config.tls
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise MedsecError(f"TLS certificate {tls.cert} / key {tls.key} unusable ({exc})") from exc
    if tls.client_ca is not None:
        try:
            ctx.load_verify_locations(tls.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise MedsecError(f"TLS client CA {tls.client_ca} unusable ({exc})") from exc


def build_state(config: ServiceConfig, verify_images: bool = True) -> ServiceState:
    """Verify and load everything the service needs; ``verify_images=False`` is for the
    load benchmark's baseline only (it is not reachable from a config file)."""
    _check_tls(config)
    model_trust = TrustStore.from_dir(config.model.trust)
    image_trust = TrustStore.from_dir(config.images.trust)
    model, meta = load_verified_model(
        config.model.checkpoint, config.model.manifest, model_trust, config.model.sha256
    )
    contract = InputContract.from_checkpoint_meta(meta)
    policy = ImagePolicy(
        trust=image_trust,
        channels=contract.channels,
        image_size=contract.size,
        rules=config.images,
        max_inflated_bytes=config.server.max_inflated_bytes,
        intensity=contract.intensity,
        window=contract.window,
        verify=verify_images,
    )
    limits = config.rate_limit
    overrides = {
        c.name: (c.rate_per_s or limits.rate_per_s, c.burst or limits.burst)
        for c in config.clients
        if c.rate_per_s is not None or c.burst is not None
    }
    reports = None
    if config.results is not None:
        reports = ReportWriter(
            config.results.dir,
            config.results.key,
            config.results.cert,
            meta["arch"],
            meta["file_sha256"],
        )
        reports.check()
    return ServiceState(
        config=config,
        model=model,
        model_meta=meta,
        policy=policy,
        auth=Authenticator(config.clients),
        limiter=RateLimiter(limits.rate_per_s, limits.burst, overrides),
        audit=AuditLog(config.audit.path, config.audit.fsync),
        reports=reports,
    )


def make_server(state: ServiceState, log_level: str = "info") -> GuardedServer:
    """A uvicorn server for ``state`` with TLS (and client certificates when configured),
    a deadline for the TLS handshake and for request headers, and a cap on open connections."""
    cfg = state.config
    app = create_app(state)
    add_stow_route(app, state)
    return GuardedServer(
        uvicorn.Config(
            app,
            host=cfg.server.host,
            port=cfg.server.port,
            http=guarded(cfg.server.header_timeout_s, cfg.server.max_connections),
            ssl_certfile=str(cfg.tls.cert),
            ssl_keyfile=str(cfg.tls.key),
            ssl_ca_certs=str(cfg.tls.client_ca) if cfg.tls.client_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if cfg.tls.client_ca else ssl.CERT_NONE,
            log_level=log_level,
            access_log=False,  # the audit log records every request
            server_header=False,
            timeout_keep_alive=5,
        ),
        handshake_timeout_s=cfg.server.header_timeout_s,
    )


def serve(config: ServiceConfig) -> None:
    """Verify, then serve (HTTPS, and DICOM C-STORE when ``[dimse]`` is set) until interrupted."""
    from medsec.service.dimse import StorageSCP

    torch.set_num_threads(config.server.torch_threads)
    state = build_state(config)
    scp = StorageSCP(state, config.dimse) if config.dimse is not None else None
    try:
        if scp is not None:
            scp.start()
        make_server(state).run()
    finally:
        if scp is not None:
            scp.stop()
        state.audit.close()

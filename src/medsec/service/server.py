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
from medsec.integrity import TrustStore
from medsec.service.access import Authenticator, RateLimiter
from medsec.service.app import ServiceState, create_app
from medsec.service.audit import AuditLog
from medsec.service.config import ServiceConfig
from medsec.service.gate import ImagePolicy
from medsec.service.model_integrity import load_verified_model


def _check_tls(config: ServiceConfig) -> None:
    """Load the certificate, key and client CA once so a bad file is a clear error, not a trace."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise MedsecError(
            f"TLS certificate {config.tls_cert} / key {config.tls_key} unusable ({exc})"
        ) from exc
    if config.tls_client_ca is not None:
        try:
            ctx.load_verify_locations(config.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise MedsecError(f"TLS client CA {config.tls_client_ca} unusable ({exc})") from exc


def build_state(config: ServiceConfig, verify_images: bool = True) -> ServiceState:
    """Verify and load everything the service needs; ``verify_images=False`` is for the
    load benchmark's baseline only (it is not reachable from a config file)."""
    _check_tls(config)
    model_trust = TrustStore.from_dir(config.model_trust)
    image_trust = TrustStore.from_dir(config.image_trust)
    model, meta = load_verified_model(
        config.checkpoint, config.model_manifest, model_trust, config.model_sha256
    )
    policy = ImagePolicy(
        trust=image_trust,
        channels=int(meta["in_channels"]),
        image_size=int(meta["image_size"]),
        require_signature=config.require_signature,
        require_creator=config.require_creator,
        allow_unsigned_elements=config.allow_unsigned_elements,
        min_mac=config.min_mac,
        modalities=config.modalities,
        resize=config.resize,
        verify=verify_images,
    )
    overrides = {
        c.name: (c.rate_per_s or config.rate_per_s, c.burst or config.burst)
        for c in config.clients
        if c.rate_per_s is not None or c.burst is not None
    }
    return ServiceState(
        config=config,
        model=model,
        model_meta=meta,
        policy=policy,
        auth=Authenticator(config.clients),
        limiter=RateLimiter(config.rate_per_s, config.burst, overrides),
        audit=AuditLog(config.audit_path, config.audit_fsync),
    )


def make_server(state: ServiceState, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for ``state`` with TLS (and client certificates when configured)."""
    cfg = state.config
    return uvicorn.Server(
        uvicorn.Config(
            create_app(state),
            host=cfg.host,
            port=cfg.port,
            ssl_certfile=str(cfg.tls_cert),
            ssl_keyfile=str(cfg.tls_key),
            ssl_ca_certs=str(cfg.tls_client_ca) if cfg.tls_client_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if cfg.tls_client_ca else ssl.CERT_NONE,
            log_level=log_level,
            access_log=False,  # the audit log records every request
            server_header=False,
            timeout_keep_alive=30,
        )
    )


def serve(config: ServiceConfig) -> None:
    """Verify, then serve until interrupted."""
    torch.set_num_threads(config.torch_threads)
    state = build_state(config)
    try:
        make_server(state).run()
    finally:
        state.audit.close()

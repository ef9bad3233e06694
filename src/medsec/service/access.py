"""Who may call the service and how often: hashed API tokens and per-client token buckets.

Tokens are 256-bit random strings, so a single SHA-256 is enough to store them safely (slow
password hashes exist for guessable secrets); the config holds only the hash, and a presented
token is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from medsec.service.config import ClientConfig

TOKEN_PREFIX = "msk_"


def new_token() -> str:
    """A fresh API token (shown once; only its hash is stored)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """SHA-256 (hex) of a token, as stored in the config's ``token_sha256``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Authenticator:
    """Maps a bearer token to a configured client name, or None."""

    def __init__(self, clients: tuple[ClientConfig, ...]) -> None:
        self._clients = [(bytes.fromhex(c.token_sha256), c.name) for c in clients]

    def client_for(self, authorization: str | None) -> str | None:
        """The client named by an ``Authorization: Bearer <token>`` header, if any matches."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = hashlib.sha256(token.strip().encode("utf-8")).digest()
        found = None
        for stored, name in self._clients:  # no early exit: time does not depend on position
            if hmac.compare_digest(stored, digest):
                found = name
        return found


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Token bucket per client: ``burst`` requests at once, refilled at ``rate`` per second."""

    def __init__(
        self,
        default_rate: float,
        default_burst: int,
        overrides: dict[str, tuple[float, int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._default = (default_rate, default_burst)
        self._overrides = dict(overrides or {})
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def acquire(self, client: str) -> float | None:
        """Take one token: None when allowed, else the seconds until one is available."""
        rate, burst = self._overrides.get(client, self._default)
        now = self._clock()
        with self._lock:
            bucket = self._buckets.setdefault(client, _Bucket(float(burst), now))
            bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.stamp) * rate)
            bucket.stamp = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return None
            return (1.0 - bucket.tokens) / rate

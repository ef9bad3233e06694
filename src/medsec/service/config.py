"""Service configuration: one TOML file, validated up front so a bad setting stops start-up.

Relative paths are resolved against the directory of the config file, so a generated config
directory can be moved as a whole. Unknown keys are errors (a typo must not silently fall back
to a default that weakens the policy).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsec.errors import MedsecError

# DICOM MAC algorithm names in increasing strength; the policy sets the weakest one accepted.
MAC_STRENGTH = ("RIPEMD160", "MD5", "SHA1", "SHA256", "SHA384", "SHA512")
FSYNC_POLICIES = ("always", "never")
NUM = (int, float)


@dataclass(frozen=True)
class ClientConfig:
    """One API client: its name (audited), the SHA-256 of its token, optional rate override."""

    name: str
    token_sha256: str
    rate_per_s: float | None = None
    burst: int | None = None


@dataclass(frozen=True)
class ServiceConfig:
    """Everything ``medsec serve`` needs; see ``medsec serve init`` for a generated example."""

    checkpoint: Path
    model_manifest: Path
    model_trust: Path
    image_trust: Path
    tls_cert: Path
    tls_key: Path
    audit_path: Path
    clients: tuple[ClientConfig, ...]
    host: str = "127.0.0.1"
    port: int = 8443
    max_body_bytes: int = 1 << 20
    torch_threads: int = 1
    model_sha256: str | None = None
    tls_client_ca: Path | None = None
    require_signature: bool = True
    require_creator: bool = True
    allow_unsigned_elements: bool = False
    min_mac: str = "SHA256"
    modalities: tuple[str, ...] = ("OT",)
    resize: bool = False
    audit_fsync: str = "always"
    rate_per_s: float = 20.0
    burst: int = 40


_SCHEMA: dict[str, set[str]] = {
    "server": {"host", "port", "max_body_bytes", "torch_threads"},
    "tls": {"cert", "key", "client_ca"},
    "model": {"checkpoint", "manifest", "trust", "sha256"},
    "images": {
        "trust",
        "require_signature",
        "require_creator",
        "allow_unsigned_elements",
        "min_mac",
        "modalities",
        "resize",
    },
    "audit": {"path", "fsync"},
    "rate_limit": {"rate_per_s", "burst"},
    "clients": {"name", "token_sha256", "rate_per_s", "burst"},
}
_REQUIRED = {
    "tls": ("cert", "key"),
    "model": ("checkpoint", "manifest", "trust"),
    "images": ("trust",),
    "audit": ("path",),
}


def _typed(section: str, key: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise MedsecError(f"config [{section}] {key}: expected a number, got {value!r}")
    if not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else "number"
        raise MedsecError(f"config [{section}] {key}: expected {name}, got {value!r}")
    return value


def _check_keys(section: str, table: dict[str, Any]) -> None:
    unknown = sorted(set(table) - _SCHEMA[section])
    if unknown:
        raise MedsecError(f"config [{section}]: unknown key {unknown[0]!r}")
    for key in _REQUIRED.get(section, ()):
        if key not in table:
            raise MedsecError(f"config [{section}]: missing required key {key!r}")


def _client(i: int, table: Any) -> ClientConfig:
    if not isinstance(table, dict):
        raise MedsecError(f"config [[clients]] #{i + 1}: expected a table")
    _check_keys("clients", table)
    for key in ("name", "token_sha256"):
        if key not in table:
            raise MedsecError(f"config [[clients]] #{i + 1}: missing required key {key!r}")
    name = _typed("clients", "name", table["name"], str)
    digest = _typed("clients", "token_sha256", table["token_sha256"], str).lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise MedsecError(f"config client {name!r}: token_sha256 must be 64 hex digits")
    rate = table.get("rate_per_s")
    burst = table.get("burst")
    return ClientConfig(
        name=name,
        token_sha256=digest,
        rate_per_s=None if rate is None else float(_typed("clients", "rate_per_s", rate, NUM)),
        burst=None if burst is None else _typed("clients", "burst", burst, int),
    )


def parse_config(data: dict[str, Any], base_dir: Path) -> ServiceConfig:
    """Validate a parsed TOML document; relative paths are taken from ``base_dir``."""
    unknown = sorted(set(data) - set(_SCHEMA))
    if unknown:
        raise MedsecError(f"config: unknown section [{unknown[0]}]")
    for section, table in data.items():
        if section != "clients":
            if not isinstance(table, dict):
                raise MedsecError(f"config [{section}] must be a table")
            _check_keys(section, table)
    for section in _REQUIRED:
        if section not in data:
            raise MedsecError(f"config: missing section [{section}]")

    def get(section: str, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        table = data.get(section, {})
        return _typed(section, key, table[key], kind) if key in table else default

    def path(section: str, key: str) -> Path:
        return base_dir / Path(get(section, key, str, ""))

    clients_raw = data.get("clients", [])
    if not isinstance(clients_raw, list) or not clients_raw:
        raise MedsecError("config: at least one [[clients]] entry is needed (see serve token)")
    clients = tuple(_client(i, t) for i, t in enumerate(clients_raw))
    names = [c.name for c in clients]
    if len(set(names)) != len(names):
        raise MedsecError("config: client names must be unique")
    if len({c.token_sha256 for c in clients}) != len(clients):
        raise MedsecError("config: two clients share one token")

    min_mac = get("images", "min_mac", str, "SHA256").upper()
    if min_mac not in MAC_STRENGTH:
        raise MedsecError(f"config [images] min_mac: choose one of {', '.join(MAC_STRENGTH)}")
    fsync = get("audit", "fsync", str, "always")
    if fsync not in FSYNC_POLICIES:
        raise MedsecError(f"config [audit] fsync: choose one of {', '.join(FSYNC_POLICIES)}")
    modalities = get("images", "modalities", list, ["OT"])
    if not modalities or not all(isinstance(m, str) and m for m in modalities):
        raise MedsecError("config [images] modalities: a non-empty list of modality codes")
    port = get("server", "port", int, 8443)
    if not 0 <= port <= 65535:
        raise MedsecError(f"config [server] port: {port} is not a TCP port")
    max_body = get("server", "max_body_bytes", int, 1 << 20)
    rate = float(get("rate_limit", "rate_per_s", (int, float), 20.0))
    burst = get("rate_limit", "burst", int, 40)
    threads = get("server", "torch_threads", int, 1)
    if max_body <= 0 or rate <= 0 or burst <= 0 or threads <= 0:
        raise MedsecError("config: max_body_bytes, rate_per_s, burst, torch_threads must be > 0")
    sha = get("model", "sha256", str, None)
    client_ca = get("tls", "client_ca", str, "")
    return ServiceConfig(
        checkpoint=path("model", "checkpoint"),
        model_manifest=path("model", "manifest"),
        model_trust=path("model", "trust"),
        model_sha256=sha.lower() if sha else None,
        image_trust=path("images", "trust"),
        tls_cert=path("tls", "cert"),
        tls_key=path("tls", "key"),
        tls_client_ca=base_dir / client_ca if client_ca else None,
        audit_path=path("audit", "path"),
        audit_fsync=fsync,
        clients=clients,
        host=get("server", "host", str, "127.0.0.1"),
        port=port,
        max_body_bytes=max_body,
        torch_threads=threads,
        require_signature=get("images", "require_signature", bool, True),
        require_creator=get("images", "require_creator", bool, True),
        allow_unsigned_elements=get("images", "allow_unsigned_elements", bool, False),
        min_mac=min_mac,
        modalities=tuple(modalities),
        resize=get("images", "resize", bool, False),
        rate_per_s=rate,
        burst=burst,
    )


def load_config(path: Path) -> ServiceConfig:
    """Read and validate a TOML config file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise MedsecError(f"config {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise MedsecError(f"config {path} cannot be read ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise MedsecError(f"config {path} is not valid TOML ({exc})") from exc
    return parse_config(data, path.parent.resolve())

"""Service configuration: one TOML file, validated by pydantic up front so a bad setting stops
start-up with one line.

Relative paths are resolved against the directory of the config file, so a generated config
directory can be moved as a whole. Unknown keys are errors (a typo must not silently fall back
to a default that weakens the policy), and values are not coerced (``port = "80"`` is an error).
The image policy (:class:`ImageRules`) is declared here once; the gate applies it as is.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from medsec.errors import MedsecError

# DICOM MAC algorithm names in increasing strength; the policy sets the weakest one accepted.
MAC_STRENGTH = ("RIPEMD160", "MD5", "SHA1", "SHA256", "SHA384", "SHA512")
MacName = Literal["RIPEMD160", "MD5", "SHA1", "SHA256", "SHA384", "SHA512"]
# Client names reach the audit log, /v1/info and generated TOML: printable, short, no quoting.
CLIENT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$"
# A listen address: an IPv4/IPv6 literal or a DNS name (no spaces, quotes or control bytes).
HOST = r"^[A-Za-z0-9:.%_-]{1,253}$"
HEX64 = r"^[0-9a-fA-F]{64}$"
# An AE title (PS3.5 VR AE): 1-16 printable ASCII characters, no backslash.
AE_TITLE = r"^[ -\[\]-~]{1,16}$"
_PATTERN_HELP = {
    CLIENT_NAME: "use up to 64 letters, digits and . _ @ + - (starting with a letter or digit)",
    HOST: "not an IP address or a DNS name",
    HEX64: "must be 64 hex digits (a SHA-256)",
    AE_TITLE: "not an AE title (1-16 printable characters, no backslash)",
}


def _relative(value: Path, info: ValidationInfo) -> Path:
    """Resolve a relative path against the config file's directory (given as context)."""
    base = (info.context or {}).get("base_dir")
    return Path(base) / value if base is not None else value


ConfigPath = Annotated[Path, Field(strict=False), AfterValidator(_relative)]
Positive = Annotated[StrictInt, Field(gt=0)]
PositiveFloat = Annotated[float, Field(strict=True, gt=0)]  # strict float still takes an int
Hex64 = Annotated[str, StringConstraints(strict=True, pattern=r"^[0-9a-fA-F]{64}$", to_lower=True)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSection(_Section):
    """Listening socket and the limits that protect it from large or slow clients."""

    host: Annotated[str, StringConstraints(strict=True, pattern=HOST)] = "127.0.0.1"
    port: Annotated[StrictInt, Field(ge=0, le=65535)] = 8443  # 0: any free port (tests)
    max_body_bytes: Positive = 1 << 20
    max_inflated_bytes: Positive = 4 << 20  # a Deflated upload may inflate to this much
    torch_threads: Positive = 1
    header_timeout_s: PositiveFloat = 10.0  # TLS handshake, then headers, each within this
    body_timeout_s: PositiveFloat = 20.0  # the whole body must arrive within this
    max_connections: Positive = 64  # beyond this, new connections are closed at once


class TLSSection(_Section):
    cert: ConfigPath
    key: ConfigPath
    client_ca: ConfigPath | None = None  # set: clients must present a certificate it signed


class ModelSection(_Section):
    checkpoint: ConfigPath
    manifest: ConfigPath
    trust: ConfigPath
    sha256: Hex64 | None = None


class ImageRules(_Section):
    """What an uploaded image must satisfy to reach the model; the gate applies it as is."""

    require_signature: StrictBool = True
    require_creator: StrictBool = True
    allow_unsigned_elements: StrictBool = False
    min_mac: MacName = "SHA256"
    modalities: Annotated[
        tuple[Annotated[str, StringConstraints(strict=True, min_length=1)], ...],
        Field(strict=False, min_length=1),
    ] = ("OT",)
    resize: StrictBool = False


class ImagesSection(ImageRules):
    """The ``[images]`` section: the rules plus where the trusted modality certificates are."""

    trust: ConfigPath


class AuditSection(_Section):
    path: ConfigPath
    fsync: Literal["always", "never"] = "always"


class RateLimitSection(_Section):
    rate_per_s: PositiveFloat = 20.0
    burst: Positive = 40


AeTitle = Annotated[str, StringConstraints(strict=True, strip_whitespace=True, pattern=AE_TITLE)]


class DimseSection(_Section):
    """``[dimse]``: the DICOM Storage SCP - where it listens, its AE title, who may call."""

    host: Annotated[str, StringConstraints(strict=True, pattern=HOST)] | None = None  # [server]
    port: Annotated[StrictInt, Field(ge=0, le=65535)] = 11112
    ae_title: AeTitle = "MEDSEC"
    calling_ae_titles: Annotated[tuple[AeTitle, ...], Field(strict=False)] = ()  # (): anyone
    tls: StrictBool = True  # PS3.15 secure transport with the [tls] certificate and client CA


class ResultsSection(_Section):
    """``[results]``: where signed DICOM SR reports go and the service key that signs them."""

    dir: ConfigPath
    key: ConfigPath
    cert: ConfigPath


class ClientConfig(_Section):
    """One API client: its name (audited), the SHA-256 of its token, optional rate override."""

    name: Annotated[str, StringConstraints(strict=True, pattern=CLIENT_NAME)]
    token_sha256: Hex64
    rate_per_s: PositiveFloat | None = None
    burst: Positive | None = None


class ServiceConfig(_Section):
    """Everything ``medsec serve`` needs; see ``medsec serve init`` for a generated example."""

    server: ServerSection = ServerSection()
    tls: TLSSection
    model: ModelSection
    images: ImagesSection
    audit: AuditSection
    rate_limit: RateLimitSection = RateLimitSection()
    dimse: DimseSection | None = None  # None: no DICOM listener
    results: ResultsSection | None = None  # None: predictions are not written as DICOM SR
    clients: Annotated[tuple[ClientConfig, ...], Field(strict=False)]

    @field_validator("clients")
    @classmethod
    def _distinct_clients(cls, clients: tuple[ClientConfig, ...]) -> tuple[ClientConfig, ...]:
        if not clients:
            raise ValueError("at least one [[clients]] entry is needed (see `medsec serve token`)")
        if len({c.name for c in clients}) != len(clients):
            raise ValueError("client names must be unique")
        if len({c.token_sha256 for c in clients}) != len(clients):
            raise ValueError("two clients share one token")
        return clients


def _one_line(exc: ValidationError) -> str:
    """The first validation error as ``config [section] key: message``."""
    err = exc.errors(include_url=False)[0]
    loc = [str(part) for part in err["loc"]]
    if err["type"] == "extra_forbidden" and len(loc) == 1:
        return f"config: unknown section [{loc[0]}]"
    if not loc:
        return f"config: {err['msg']}"
    where = f"[{loc[0]}]" if loc[0] != "clients" else "[[clients]]"
    if loc[0] == "clients" and len(loc) > 1:
        where += f" #{int(loc[1]) + 1}"
        loc = loc[1:]
    key = " ".join(loc[1:])
    if err["type"] == "extra_forbidden":
        return f"config {where}: unknown key {key!r}"
    if err["type"] == "missing":
        return f"config: missing section {where}" if not key else f"config {where}: missing {key!r}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "string_pattern_mismatch":
        msg = _PATTERN_HELP.get(err.get("ctx", {}).get("pattern", ""), msg)
    got = "" if isinstance(err["input"], dict | list) else f" (got {err['input']!r:.80})"
    return f"config {where}{' ' + key if key else ''}: {msg}{got}"


def parse_config(data: dict[str, Any], base_dir: Path) -> ServiceConfig:
    """Validate a parsed TOML document; relative paths are taken from ``base_dir``."""
    try:
        return ServiceConfig.model_validate(data, context={"base_dir": Path(base_dir)})
    except ValidationError as exc:
        raise MedsecError(_one_line(exc)) from None


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

"""`medsec serve` (run, init, token, sign-model) and `medsec audit verify`.

Exit codes: ``medsec serve`` exits 2 with one line when it refuses to start (bad config, TLS
files, trust stores, model signature or hash, broken audit log). ``medsec audit verify`` exits
0 when the chain is intact and 1 when it is broken, naming the first bad line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medsec.errors import MedsecError


def _port(text: str) -> int:
    """argparse type: a TCP port, so a bad one is refused at init and not when serving."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return port


def _serve(args: argparse.Namespace) -> int:
    if args.config is None:
        raise MedsecError("give --config FILE (or run `medsec serve init` to create one)")
    from medsec.service.config import load_config
    from medsec.service.server import serve

    serve(load_config(Path(args.config)))
    return 0


def _init(args: argparse.Namespace) -> int:
    from medsec.service.bootstrap import init_service_dir

    if bool(args.tls_cert) != bool(args.tls_key):
        raise MedsecError("give --tls-cert and --tls-key together (or neither)")
    result = init_service_dir(
        Path(args.out),
        Path(args.checkpoint),
        host=args.host,
        port=args.port,
        client=args.client,
        image_trust=Path(args.image_trust) if args.image_trust else None,
        keys_out=Path(args.keys_out) if args.keys_out else None,
        tls=(Path(args.tls_cert), Path(args.tls_key)) if args.tls_cert else None,
    )
    print(f"config:   {result.config}")
    if result.ca_cert is not None:
        print(f"TLS CA:   {result.ca_cert} (clients trust this certificate)")
    print(f"keys:     {result.keys} (signing keys: keep them off the service host)")
    if result.modality_key is not None:
        print(
            f"modality: sign images with --key {result.modality_key} --cert {result.modality_cert}"
        )
    print(f"token for client {args.client!r} (shown once; only its hash is stored):")
    print(result.token)
    print(f"start:    medsec serve --config {result.config}")
    return 0


def _token(args: argparse.Namespace) -> int:
    import tomlkit

    from medsec.service.access import hash_token, new_token
    from medsec.service.bootstrap import check_client_name

    name = check_client_name(args.name)
    token = new_token()
    entry = tomlkit.aot()  # written by a TOML library: the name cannot open a table
    entry.append(tomlkit.table().add("name", name).add("token_sha256", hash_token(token)))
    print(f"token (give it to the client; shown once): {token}")
    print("add to the service config:")
    print(tomlkit.dumps({"clients": entry}).strip())
    return 0


def _sign_model(args: argparse.Namespace) -> int:
    from medsec.service.model_integrity import sign_checkpoint

    checkpoint = Path(args.checkpoint)
    out = Path(args.out or f"{checkpoint}.sig.json")
    sha = sign_checkpoint(checkpoint, out, Path(args.key), Path(args.cert), overwrite=args.force)
    print(f"signed {checkpoint} (sha256 {sha}) -> {out}")
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from medsec.service.audit import verify_log

    check = verify_log(Path(args.log))
    if check.ok:
        print(f"{args.log}: OK, {check.reason}")
        return 0
    print(f"{args.log}: BROKEN at line {check.bad_line}: {check.reason}")
    return 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve`` and ``audit`` verbs."""
    serve = sub.add_parser(
        "serve",
        help="hardened inference service: TLS, tokens, verified images, audit log",
        description="Run the service (--config), or prepare one: init, token, sign-model.",
    )
    serve.add_argument("--config", help="service config (TOML); see `medsec serve init`")
    serve.set_defaults(func=_serve)
    actions = serve.add_subparsers(dest="serve_command", metavar="<action>")

    init = actions.add_parser("init", help="generate config, TLS, signed model copy and a token")
    init.add_argument("--out", required=True, help="new directory for the service files")
    init.add_argument("--checkpoint", required=True, help="medsec checkpoint to serve")
    init.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    init.add_argument("--port", type=_port, default=8443, help="TCP port (default 8443)")
    init.add_argument("--client", default="default", help="name of the first API client")
    init.add_argument("--image-trust", help="existing directory of trusted modality certificates")
    init.add_argument(
        "--keys-out",
        help="new directory for the signing keys, outside the service (default OUT-keys)",
    )
    init.add_argument("--tls-cert", help="the operator's server certificate (PEM) to use")
    init.add_argument("--tls-key", help="its private key (PEM); with --tls-cert, no CA is made")
    init.set_defaults(func=_init)

    token = actions.add_parser("token", help="new API token and its config entry")
    token.add_argument("--name", required=True, help="client name (appears in the audit log)")
    token.set_defaults(func=_token)

    sign = actions.add_parser("sign-model", help="sign a checkpoint (detached manifest)")
    sign.add_argument("--checkpoint", required=True)
    sign.add_argument("--key", required=True, help="model signer private key (PEM)")
    sign.add_argument("--cert", required=True, help="model signer certificate (PEM)")
    sign.add_argument("--out", help="manifest path (default CHECKPOINT.sig.json)")
    sign.add_argument("--force", action="store_true", help="overwrite an existing manifest")
    sign.set_defaults(func=_sign_model)

    audit = sub.add_parser("audit", help="check the service's hash-chained audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="<command>")
    audit_sub.required = True
    verify = audit_sub.add_parser(
        "verify",
        help="exit 0 if the chain is intact, 1 naming the first edited/deleted/reordered line",
    )
    verify.add_argument("log")
    verify.set_defaults(func=_audit_verify)

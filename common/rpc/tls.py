"""TLS for every gRPC hop: server certificates, mutual TLS where a CA is given, plaintext only on request.

A service with `--tls-cert/--tls-key` serves TLS; adding `--tls-ca` makes it require and verify client
certificates signed by that CA (mTLS: the draft and verifier services accept only the gateway). A caller
(the gateway towards its upstreams, the Python client, `specd health`) trusts `ca` (the system's roots when
none is given) and presents `cert/key` when given. Without certificates a service refuses to start unless
`--insecure` is passed, and then it says so in its log.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.errors import ConfigError

log = logging.getLogger(__name__)


def _read_pem(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {path!r}: cannot be read ({e.strerror})") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{what} {path!r}: not a PEM file (no '-----BEGIN' line)")
    return data


@dataclass(slots=True)
class TLSConfig:
    cert: str | None = None            # PEM certificate chain presented by this side
    key: str | None = None             # its PEM private key
    ca: str | None = None              # PEM CA bundle that peers must be signed by (caller: default system roots)
    insecure: bool = False             # plaintext, explicitly asked for (local development only)
    server_name: str | None = None     # caller side: the name expected in the server's certificate

    def __post_init__(self):
        # Empty strings come from unset-but-present environment variables: they mean "not given".
        self.cert, self.key, self.ca = self.cert or None, self.key or None, self.ca or None
        self.server_name = self.server_name or None
        if bool(self.cert) != bool(self.key):
            raise ConfigError("TLS: a certificate and its key go together (--tls-cert and --tls-key)")
        if self.insecure and (self.cert or self.ca):
            raise ConfigError("TLS: --insecure (SPECD_INSECURE) contradicts the certificate flags; pass one or "
                              "the other")

    @property
    def mutual(self) -> bool:
        """Server side: client certificates are required (a CA to check them against is given)."""
        return not self.insecure and self.ca is not None

    def describe(self) -> str:
        if self.insecure:
            return "PLAINTEXT"
        return "mTLS (client certificates required)" if self.mutual else "TLS"

    # ---- server side ----------------------------------------------------------------------------------------
    def check_server(self, what: str) -> None:
        """Raise ConfigError unless this can serve: certificates that read, or plaintext explicitly asked for."""
        if self.insecure:
            return
        if not self.cert:
            extra = " (--tls-ca alone only says which clients to accept)" if self.ca else ""
            raise ConfigError(f"{what}: no TLS certificate{extra}; pass --tls-cert/--tls-key (and --tls-ca to "
                              "require client certificates), or --insecure for plaintext local development "
                              "(env SPECD_TLS_CERT / SPECD_TLS_KEY / SPECD_TLS_CA / SPECD_INSECURE)")
        _read_pem(self.cert, "TLS certificate")
        _read_pem(self.key, "TLS key")
        _read_pem(self.ca, "TLS CA")

    def server_credentials(self, what: str) -> grpc.ServerCredentials | None:
        """Credentials for a server, or None for plaintext (only when `insecure`, with a warning)."""
        self.check_server(what)
        if self.insecure:
            log.warning("%s: serving PLAINTEXT gRPC (--insecure): anyone who can reach the port can call it and "
                        "read the traffic; use it for local development only", what)
            return None
        pair = (_read_pem(self.key, "TLS key"), _read_pem(self.cert, "TLS certificate"))
        ca = _read_pem(self.ca, "TLS CA")
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)

    # ---- caller side ----------------------------------------------------------------------------------------
    def ssl_server_context(self, what: str):
        """The same certificate (and client-certificate requirement) for a non-gRPC server (the gateway's HTTP
        door); None when plaintext."""
        import ssl
        if self.insecure:
            return None
        self.check_server(what)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        if self.ca is not None:
            ctx.load_verify_locations(self.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """Credentials for a caller, or None for plaintext (only when `insecure`)."""
        if self.insecure:
            return None
        return grpc.ssl_channel_credentials(root_certificates=_read_pem(self.ca, "TLS CA"),
                                            private_key=_read_pem(self.key, "TLS key"),
                                            certificate_chain=_read_pem(self.cert, "TLS certificate"))

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name and not self.insecure \
            else []


PLAINTEXT = TLSConfig(insecure=True)


def sync_channel(target: str, tls: TLSConfig | None, options=()) -> grpc.Channel:
    """A blocking channel to `target`; `tls=None` is plaintext (the caller asked for it by passing nothing)."""
    tls = tls or PLAINTEXT
    creds = tls.channel_credentials()
    options = [*options, *tls.channel_options()]
    return grpc.secure_channel(target, creds, options=options) if creds else grpc.insecure_channel(target, options)


def aio_channel(target: str, tls: TLSConfig, options=(), interceptors=None) -> grpc.aio.Channel:
    creds = tls.channel_credentials()
    options = [*options, *tls.channel_options()]
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, creds, options=options, interceptors=interceptors)

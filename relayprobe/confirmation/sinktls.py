"""The canary sink's TLS: a server context with the operator's certificate, or with a throwaway
self-signed one made at start.

Relays delivering to an MX do opportunistic TLS (RFC 7435) and verify nothing, so a throwaway
certificate is enough for them; it exists for relays that deliver only over TLS (Postfix
`smtp_tls_security_level = encrypt`). The throwaway key never touches a disk: it reaches OpenSSL,
which loads only files, through a pipe.
"""

from __future__ import annotations

import datetime
import os
import select
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager

THROWAWAY_VALIDITY = datetime.timedelta(days=365)
# X.509's upper bound for a common name (RFC 5280, ub-common-name); the SAN has none.
MAX_COMMON_NAME = 64
FALLBACK_COMMON_NAME = "relayprobe canary sink"


class SinkTLSError(ValueError):
    """The certificate or key cannot be used; the message names the file and says why."""


def sink_tls_context(
    *, hostname: str, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """A TLS 1.2+ server context with the certificate chain and key in `cert_file` and `key_file`
    (PEM), or with neither, a throwaway self-signed certificate for `hostname`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is None and key_file is None:
        certificate, key = throwaway_certificate(hostname)
        with _piped(certificate) as cert_path, _piped(key) as key_path:
            context.load_cert_chain(cert_path, key_path)
        return context
    if cert_file is None or key_file is None:
        raise SinkTLSError("give both a certificate and its private key, or neither")
    for path in (cert_file, key_file):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise SinkTLSError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password(key_file))
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            reason = "the key does not belong to the certificate"
        else:
            reason = "expected a PEM certificate chain and its PEM private key"
        raise SinkTLSError(f"{cert_file} and {key_file}: {reason}") from None
    return context


def throwaway_certificate(hostname: str) -> tuple[bytes, bytes]:
    """A self-signed certificate for `hostname` (EC P-256, valid a year) and its key, in PEM."""
    # Imported here: only a running sink needs it, not every `check`.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    common_name = hostname if len(hostname) <= MAX_COMMON_NAME else FALLBACK_COMMON_NAME
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + THROWAWAY_VALIDITY)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


@contextmanager
def _piped(data: bytes) -> Iterator[str]:
    """A path from which `data` can be read once."""
    read_end, write_end = os.pipe()
    try:
        try:
            # A few hundred bytes: one write, well within a pipe's buffer, so it cannot block.
            assert len(data) < select.PIPE_BUF
            os.write(write_end, data)
        finally:
            os.close(write_end)
        yield f"/dev/fd/{read_end}"
    finally:
        os.close(read_end)


def _no_password(key_file: str) -> Callable[[], bytes]:
    """OpenSSL asks on the terminal for the password of an encrypted key: refuse instead."""

    def refuse() -> bytes:
        raise SinkTLSError(f"{key_file}: the key is encrypted; give it unencrypted (mode 0600)")

    return refuse

"""What a tested server's TLS certificate says: whom it names, who signed it, when it expires.

The certificate comes from the network and is never verified (a sending MTA's opportunistic TLS,
RFC 7435): every value is sanitised and cut short before anyone sees it.
"""

from __future__ import annotations

from relayprobe.relaytest.events import Certificate
from relayprobe.relaytest.sanitize import sanitize_text

# A distinguished name can be kilobytes; a transcript line needs its start.
MAX_NAME_CHARS = 200


def _shown(text: str) -> str:
    text = sanitize_text(text)
    return text if len(text) <= MAX_NAME_CHARS else f"{text[:MAX_NAME_CHARS]}..."


def describe(der: bytes) -> Certificate | None:
    """The certificate in `der`, or None when it is not one that can be read."""
    # Imported here: only a test that negotiates TLS needs it, not every `check`.
    from cryptography import x509

    try:
        certificate = x509.load_der_x509_certificate(der)
        subject, issuer = certificate.subject, certificate.issuer
        return Certificate(
            subject=_shown(subject.rfc4514_string()),
            issuer=_shown(issuer.rfc4514_string()),
            not_after=certificate.not_valid_after_utc.date().isoformat(),
            self_signed=subject == issuer,
        )
    except ValueError:
        return None

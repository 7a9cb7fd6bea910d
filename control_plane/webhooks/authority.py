"""The webhooks' own certificate authority (`webhook.certificates: self`): a CA and the serving
certificate it signs, made, checked and renewed with `cryptography`, without any I/O.

The material lives in the control plane's Secret (see `keeper`) under four keys:
`ca.crt` (the CA bundle the webhook configurations trust: the current CA first, then older CAs
that have not expired), `ca.key` (the current CA's key, so every replica can renew the serving
certificate without changing what the API server trusts), `tls.crt` and `tls.key` (the serving
certificate for the Service's DNS name and its key).

Renewal, as cert-manager's default: a certificate is replaced once less than a third of its
lifetime is left. The serving certificate is renewed from the same CA, so `caBundle` does not
change. When the CA itself is renewed, the old CA stays in the bundle until it expires, so a
replica still serving a certificate the old CA signed stays trusted while the others switch.

Keys are ECDSA P-256 (what the API server's Go TLS client and every current client accept;
quick to make at start). Certificates start five minutes in the past, for clocks that differ.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SECRET_KEYS: Final = ("ca.crt", "ca.key", "tls.crt", "tls.key")
CA_NAME: Final = "outrigger webhook CA"
BACKDATE: Final = datetime.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class Lifetimes:
    """How long the CA and the serving certificate are valid; each is renewed with a third of
    its lifetime left."""

    ca: datetime.timedelta = datetime.timedelta(days=3650)
    serving: datetime.timedelta = datetime.timedelta(days=365)


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """PEM bytes, as kept in the Secret."""

    ca_bundle: bytes
    ca_key: bytes
    cert: bytes
    key: bytes

    def secret_data(self) -> dict[str, str]:
        """The Secret's `data` (base64 of each PEM)."""
        values = (self.ca_bundle, self.ca_key, self.cert, self.key)
        return {k: base64.b64encode(v).decode() for k, v in zip(SECRET_KEYS, values, strict=True)}

    @property
    def ca_bundle_b64(self) -> str:
        """What a webhook's `clientConfig.caBundle` holds."""
        return base64.b64encode(self.ca_bundle).decode()

    @property
    def not_after(self) -> datetime.datetime:
        return x509.load_pem_x509_certificate(self.cert).not_valid_after_utc


class MaterialError(Exception):
    """Stored material that cannot be used (the message says why)."""


def from_secret_data(data: Mapping[str, str] | None) -> TlsMaterial:
    """The material in a Secret's `data`; MaterialError when a key is missing or not base64."""
    data = data or {}
    missing = [k for k in SECRET_KEYS if not data.get(k)]
    if len(missing) == len(SECRET_KEYS):
        raise MaterialError("the Secret is empty")
    if missing:
        raise MaterialError(f"the Secret lacks {', '.join(missing)}")
    try:
        values = [base64.b64decode(data[k], validate=True) for k in SECRET_KEYS]
    except (binascii.Error, ValueError) as exc:
        raise MaterialError(f"the Secret's data is not base64: {exc}") from None
    return TlsMaterial(*values)


@dataclass(frozen=True, slots=True)
class _Parsed:
    cas: list[x509.Certificate]
    ca_key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _parse(material: TlsMaterial) -> _Parsed:
    try:
        cas = x509.load_pem_x509_certificates(material.ca_bundle)
        cert = x509.load_pem_x509_certificate(material.cert)
        ca_key = serialization.load_pem_private_key(material.ca_key, None)
        key = serialization.load_pem_private_key(material.key, None)
    except ValueError as exc:
        raise MaterialError(f"a certificate or key does not parse: {exc}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or not isinstance(
        key, ec.EllipticCurvePrivateKey
    ):
        raise MaterialError("the keys are not ECDSA keys")
    return _Parsed(cas, ca_key, cert, key)


def _public_der(key: ec.EllipticCurvePublicKey | object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return b""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _due(cert: x509.Certificate, now: datetime.datetime) -> bool:
    """Less than a third of its lifetime left (or not valid yet)."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return now < start or end - now < (end - start) / 3


def review(material: TlsMaterial, dns_name: str, now: datetime.datetime) -> str | None:
    """Why `material` must be replaced, or None when it can be served as it is."""
    parsed = _parse(material)
    ca = parsed.cas[0] if parsed.cas else None
    if ca is None or _public_der(ca.public_key()) != _public_der(parsed.ca_key.public_key()):
        return "ca.key does not belong to the first certificate of ca.crt"
    if _due(ca, now):
        return f"the CA expires {ca.not_valid_after_utc:%Y-%m-%d %H:%M}Z"
    if _public_der(parsed.cert.public_key()) != _public_der(parsed.key.public_key()):
        return "tls.key does not belong to tls.crt"
    try:
        parsed.cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "tls.crt is not signed by the current CA"
    try:
        names = parsed.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        dns_names = names.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns_names = []
    if dns_name not in dns_names:
        return f"tls.crt is for {', '.join(dns_names) or 'no DNS name'}, not {dns_name}"
    if _due(parsed.cert, now):
        return f"the serving certificate expires {parsed.cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z"
    return None


def renew(
    stored: TlsMaterial | None, dns_name: str, now: datetime.datetime, lifetimes: Lifetimes
) -> TlsMaterial:
    """New material for `dns_name`: a serving certificate from the stored CA when that CA is
    sound and not due, else from a new CA (the stored CAs that have not expired stay in the
    bundle after it)."""
    kept: list[x509.Certificate] = []
    parsed = _parse_or_none(stored)
    if stored is not None and parsed is not None and parsed.cas:
        current = parsed.cas[0]
        if _public_der(current.public_key()) == _public_der(parsed.ca_key.public_key()):
            kept = [ca for ca in parsed.cas if ca.not_valid_after_utc > now]
            if not _due(current, now):
                cert, key = _serving(dns_name, current, parsed.ca_key, now, lifetimes)
                return TlsMaterial(_bundle(kept), stored.ca_key, cert, key)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _authority(ca_key, now, lifetimes.ca)
    cert, key = _serving(dns_name, ca, ca_key, now, lifetimes)
    return TlsMaterial(_bundle([ca, *kept]), _key_pem(ca_key), cert, key)


def _parse_or_none(material: TlsMaterial | None) -> _Parsed | None:
    if material is None:
        return None
    try:
        return _parse(material)
    except MaterialError:
        return None


def _bundle(cas: list[x509.Certificate]) -> bytes:
    return b"".join(ca.public_bytes(serialization.Encoding.PEM) for ca in cas)


def newest_ca(bundle: bytes) -> datetime.datetime | None:
    """When the newest CA in a PEM bundle was made (None: no certificate in it)."""
    try:
        cas = x509.load_pem_x509_certificates(bundle)
    except ValueError:
        return None
    return max((ca.not_valid_before_utc for ca in cas), default=None)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(*, authority: bool) -> x509.KeyUsage:
    """A CA signs certificates (and CRLs); an ECDSA serving certificate signs handshakes."""
    return x509.KeyUsage(
        digital_signature=not authority,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=authority,
        crl_sign=authority,
        encipher_only=False,
        decipher_only=False,
    )


def _authority(
    key: ec.EllipticCurvePrivateKey, now: datetime.datetime, lifetime: datetime.timedelta
) -> x509.Certificate:
    # A fresh serial in the name as well: two CAs made in the same second stay distinct.
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "outrigger"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{CA_NAME} {secrets.token_hex(4)}"),
        ]
    )
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(authority=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _serving(
    dns_name: str,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime.datetime,
    lifetimes: Lifetimes,
) -> tuple[bytes, bytes]:
    """A serving certificate for `dns_name` signed by `ca` (never outliving it), and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + lifetimes.serving, ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(authority=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

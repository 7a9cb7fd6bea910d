"""The webhooks' own CA: what is made, what is judged sound, and what a renewal keeps."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509

from control_plane.webhooks.authority import (
    Lifetimes,
    MaterialError,
    TlsMaterial,
    from_secret_data,
    newest_ca,
    renew,
    review,
)

DNS = "outrigger.outrigger-system.svc"
NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)


def certificates(bundle: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(bundle)


def test_new_material_is_a_ca_and_a_serving_certificate_for_the_dns_name() -> None:
    material = renew(None, DNS, NOW, Lifetimes())
    assert review(material, DNS, NOW) is None
    (ca,) = certificates(material.ca_bundle)
    cert = x509.load_pem_x509_certificate(material.cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [DNS]
    assert cert.not_valid_after_utc == NOW + datetime.timedelta(days=365)
    assert ca.not_valid_after_utc == NOW + datetime.timedelta(days=3650)
    assert from_secret_data(material.secret_data()) == material


def test_the_serving_certificate_is_renewed_from_the_same_ca_with_a_third_left() -> None:
    material = renew(None, DNS, NOW, Lifetimes())
    assert review(material, DNS, NOW + 240 * DAY) is None
    later = NOW + 250 * DAY  # 115 of 365 days left
    reason = review(material, DNS, later)
    assert reason is not None and reason.startswith("the serving certificate expires 2031-01-01")
    renewed = renew(material, DNS, later, Lifetimes())
    assert review(renewed, DNS, later) is None
    # What the API server trusts does not change: the bundle and the CA key stay.
    assert (renewed.ca_bundle, renewed.ca_key) == (material.ca_bundle, material.ca_key)
    assert renewed.cert != material.cert and renewed.key != material.key


def test_a_renewed_ca_keeps_the_old_one_in_the_bundle_until_it_expires() -> None:
    material = renew(None, DNS, NOW, Lifetimes())
    later = NOW + 2500 * DAY  # the CA has 1150 of 3650 days left: due
    assert (review(material, DNS, later) or "").startswith("the CA expires")
    renewed = renew(material, DNS, later, Lifetimes())
    new, old = certificates(renewed.ca_bundle)
    assert old == certificates(material.ca_bundle)[0]
    x509.load_pem_x509_certificate(renewed.cert).verify_directly_issued_by(new)
    assert newest_ca(renewed.ca_bundle) == new.not_valid_before_utc > old.not_valid_before_utc
    # The serving certificate never outlives its CA.
    assert renewed.not_after <= new.not_valid_after_utc
    much_later = NOW + 3700 * DAY  # the old CA has expired: the next renewal drops it
    again = renew(renewed, DNS, much_later, Lifetimes())
    assert certificates(again.ca_bundle) == [new]


def test_material_for_another_name_or_with_mismatched_keys_is_replaced() -> None:
    material = renew(None, DNS, NOW, Lifetimes())
    assert review(material, "other.ns.svc", NOW) == f"tls.crt is for {DNS}, not other.ns.svc"
    other = renew(None, DNS, NOW, Lifetimes())
    swapped = TlsMaterial(material.ca_bundle, material.ca_key, material.cert, other.key)
    assert review(swapped, DNS, NOW) == "tls.key does not belong to tls.crt"
    foreign = TlsMaterial(material.ca_bundle, material.ca_key, other.cert, other.key)
    assert review(foreign, DNS, NOW) == "tls.crt is not signed by the current CA"
    stolen = TlsMaterial(material.ca_bundle, other.ca_key, material.cert, material.key)
    assert review(stolen, DNS, NOW) == "ca.key does not belong to the first certificate of ca.crt"
    fresh = renew(stolen, DNS, NOW, Lifetimes())  # no CA to trust: a new one, nothing kept
    assert len(certificates(fresh.ca_bundle)) == 1 and fresh.ca_bundle != material.ca_bundle


def test_an_empty_partial_or_garbled_secret_is_refused_with_the_reason() -> None:
    with pytest.raises(MaterialError, match="the Secret is empty"):
        from_secret_data(None)
    data = renew(None, DNS, NOW, Lifetimes()).secret_data()
    with pytest.raises(MaterialError, match=r"the Secret lacks ca\.key, tls\.key"):
        from_secret_data({k: v for k, v in data.items() if k in ("ca.crt", "tls.crt")})
    with pytest.raises(MaterialError, match="not base64"):
        from_secret_data({**data, "tls.key": "not base64!"})
    garbled = from_secret_data({**data, "tls.crt": "Z2FyYmFnZQ=="})
    with pytest.raises(MaterialError, match="does not parse"):
        review(garbled, DNS, NOW)
    assert review(renew(garbled, DNS, NOW, Lifetimes()), DNS, NOW) is None

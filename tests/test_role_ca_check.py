"""The role's check of stacksense_ca_certificate (plugins/filter/ca_certificate.py), run on
the controller before a host is touched, against certificates made for the test."""

import datetime
import importlib.util
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

FILTER_PATH = Path(__file__).resolve().parents[1] / "plugins" / "filter" / "ca_certificate.py"
NOW = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc)


def _load_filter():
    spec = importlib.util.spec_from_file_location("check_ca_certificate", str(FILTER_PATH))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ca_certificate_problem


problem = _load_filter()


def ca_pem(name="Test CA", days=30, key=None):
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(NOW - datetime.timedelta(days=60))
                   .not_valid_after(NOW + datetime.timedelta(days=days))
                   .sign(key, hashes.SHA256()))
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def test_one_ca_certificate_passes():
    assert problem(ca_pem(), now=NOW) == ""


def test_a_bundle_of_two_certificates_with_text_around_them_passes():
    assert problem("# company CAs\n" + ca_pem("Root") + "\n" + ca_pem("Issuing"), now=NOW) == ""


@pytest.mark.parametrize(("text", "expected"), [
    ("", "is empty"),
    ("   \n", "is empty"),
    (["not", "text"], "is not text"),
    ("/etc/ssl/certs/company-ca.pem", "holds no PEM certificate"),
    ("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
     "certificate 1 is not a DER certificate"),
    ("-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
     "certificate 1 is not base64 text"),
    ("-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n",
     "certificate 1 does not parse"),
])
def test_text_that_holds_no_usable_certificate_is_named(text, expected):
    assert problem(text, now=NOW).startswith(expected)


def test_a_private_key_is_refused_even_next_to_a_certificate():
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()

    assert problem(ca_pem(key=key) + key_pem, now=NOW).startswith("holds a PRIVATE KEY")


def test_an_expired_second_certificate_is_named_with_its_subject_and_date():
    text = ca_pem("Root") + ca_pem("Old Issuing", days=-1)

    assert problem(text, now=NOW) == "certificate 2 (CN=Old Issuing) expired on 2026-11-30"

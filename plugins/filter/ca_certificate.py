"""What is wrong with PEM text meant as CA certificates (stacksense_ca_certificate).

The role's preflight (role_plan.py's variable_problems) calls it on the controller, before
the host is touched; it gives "" when the text is usable, else a phrase for the preflight
message ("holds no certificate ...", "certificate 2 (CN=...) expired on ..."), so a bad value
gives a clear message rather than an error. A filter, not a task: at fleet scale every task
costs each host a worker (docs/DEPLOY_BENCHMARKS.md). Certificates are parsed with
`cryptography`, which ansible-core itself requires, so the controller needs nothing more.
"""

import base64
import binascii
import datetime
import re

DOCUMENTATION = r"""
name: ca_certificate_problem
short_description: What is wrong with PEM text meant as CA certificates
description:
  - V("") when the text holds at least one PEM certificate and every certificate in it parses
    and has not expired; else a phrase saying what is wrong, for preflight's message.
positional: _input
options:
  _input:
    description: The PEM text (stacksense_ca_certificate).
    type: raw
    required: true
version_added: 1.2.0
author: StackSense
"""

EXAMPLES = r"""
problem: "{{ stacksense_ca_certificate | stacksense.fleet.ca_certificate_problem }}"
"""

RETURN = r"""
_value:
  description: V("") or what is wrong.
  type: str
"""

PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)
BASE64_TEXT = re.compile(r"[A-Za-z0-9+/=\s]*\Z")


def _load_certificate(der):
    """The parsed certificate, or None when cryptography is missing (then DER is checked only)."""
    try:
        from cryptography import x509
    except ImportError:
        return None
    return x509.load_der_x509_certificate(der)


def _expiry(certificate):
    if hasattr(certificate, "not_valid_after_utc"):
        return certificate.not_valid_after_utc
    return certificate.not_valid_after.replace(tzinfo=datetime.timezone.utc)


def _block_problem(number, body, now):
    """What is wrong with the base64 body of one CERTIFICATE block ("" if nothing)."""
    if not BASE64_TEXT.match(body):
        return f"certificate {number} is not base64 text"
    try:
        der = base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        return f"certificate {number} is not valid base64"
    if not der.startswith(b"\x30"):
        return f"certificate {number} is not a DER certificate"
    try:
        certificate = _load_certificate(der)
    except ValueError as error:
        return f"certificate {number} does not parse ({error})"
    if certificate is not None and _expiry(certificate) < now:
        subject = certificate.subject.rfc4514_string() or "no subject"
        return f"certificate {number} ({subject}) expired on {_expiry(certificate):%Y-%m-%d}"
    return ""


def ca_certificate_problem(text, now=None):
    """"" when `text` holds at least one PEM certificate, all valid; else what is wrong."""
    if not isinstance(text, str):
        return "is not text"
    if not text.strip():
        return "is empty"
    blocks = PEM_BLOCK.findall(text)
    if any("PRIVATE KEY" in label for label, _body in blocks):
        return ("holds a PRIVATE KEY (give the CA's certificate only; a key never leaves "
                "its server)")
    bodies = [body for label, body in blocks if label == "CERTIFICATE"]
    if not bodies:
        return ("holds no PEM certificate (a block from -----BEGIN CERTIFICATE----- to "
                "-----END CERTIFICATE-----)")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    for number, body in enumerate(bodies, 1):
        problem = _block_problem(number, body, now)
        if problem:
            return problem
    return ""


class FilterModule:
    def filters(self):
        return {"ca_certificate_problem": ca_certificate_problem}

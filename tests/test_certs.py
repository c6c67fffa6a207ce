"""The certificates `ledger auth init --tls` writes: a leaf names and is signed by its CA; a CA key that cannot sign
with SHA-256 is a user's mistake (one line), not a traceback."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import NameOID

from ledger.errors import InvalidInput
from ledgerctl import certs


def self_signed_ca(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> certs.Issued:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone else's CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return certs.Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def assert_issued_by(leaf: certs.Issued, ca: certs.Issued) -> None:
    cert, ca_cert = x509.load_pem_x509_certificate(leaf.cert_pem), x509.load_pem_x509_certificate(ca.cert_pem)
    cert.verify_directly_issued_by(ca_cert)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_a_leaf_is_signed_by_its_ca_and_names_its_key():
    ca = certs.make_ca()
    assert_issued_by(certs.issue(ca, "nats-server", hosts=("127.0.0.1", "nats-1"), server=True), ca)


def test_an_rsa_ca_still_signs():
    ca = self_signed_ca(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    assert_issued_by(certs.issue(ca, "agent-a1", client=True), ca)


def test_a_ca_key_that_cannot_sign_with_sha256_is_refused_in_one_line():
    ca = self_signed_ca(ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(InvalidInput, match="not a usable CA key: a .*Ed25519.* does not sign with SHA-256"):
        certs.issue(ca, "agent-a1", client=True)

"""Throwaway PKI for the TLS tests: a CA, a certificate it signs for server and client use (SAN 127.0.0.1 and
localhost), and a second, unrelated CA with a client certificate of its own. EC P-256 keys: milliseconds to make."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.rpc.tls import TLSConfig


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(common_name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca, common_name: str, dns=("localhost",), ips=("127.0.0.1",)):
    """A leaf certificate signed by `ca`, good for both server and client authentication."""
    import ipaddress
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


@dataclass
class PKI:
    ca: str                 # the CA everything legitimate chains to
    cert: str               # a certificate it signed (server and client use), SAN localhost / 127.0.0.1
    key: str
    other_ca: str           # an unrelated CA
    rogue_cert: str         # a client certificate signed by the unrelated CA
    rogue_key: str

    def server(self, mutual: bool = True) -> TLSConfig:
        return TLSConfig(cert=self.cert, key=self.key, ca=self.ca if mutual else None)

    def client(self, with_cert: bool = True) -> TLSConfig:
        return TLSConfig(ca=self.ca, cert=self.cert if with_cert else None, key=self.key if with_cert else None)

    def rogue_client(self) -> TLSConfig:
        return TLSConfig(ca=self.ca, cert=self.rogue_cert, key=self.rogue_key)


def write_pki(folder: Path) -> PKI:
    folder.mkdir(parents=True, exist_ok=True)

    def save(name: str, data: bytes) -> str:
        path = folder / name
        path.write_bytes(data)
        path.chmod(0o600)
        return str(path)

    ca = make_ca("specd test CA")
    other = make_ca("some other CA")
    key, cert = issue(ca, "specd")
    rogue_key, rogue_cert = issue(other, "intruder")
    pem = serialization.Encoding.PEM
    return PKI(ca=save("ca.crt", ca[1].public_bytes(pem)), cert=save("tls.crt", cert.public_bytes(pem)),
               key=save("tls.key", _key_pem(key)), other_ca=save("other-ca.crt", other[1].public_bytes(pem)),
               rogue_cert=save("rogue.crt", rogue_cert.public_bytes(pem)),
               rogue_key=save("rogue.key", _key_pem(rogue_key)))

"""A small fleet PKI for the broker's TLS: a CA, a server certificate, device client certificates.

EC P-256 keys, written 0600. Device certificates carry the device id as their common name so
that Mosquitto's `use_identity_as_username` maps a certificate to the device's ACL entries.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    def client_cert(self, name: str) -> Path:
        return self.directory / "clients" / f"{name}.crt"

    def client_key(self, name: str) -> Path:
        return self.directory / "clients" / f"{name}.key"

    def init(self, fleet: str, hosts: list[str], *, days: int = 3650) -> None:
        if self.ca_cert.exists():
            raise FileExistsError(f"{self.ca_cert} exists: this PKI is already initialised")
        self.directory.mkdir(parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edgeswarm {fleet} CA")])
        now = datetime.now(UTC)
        ca = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        _write_key(self.ca_key, ca_key)
        self.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        self._issue("broker", hosts, self.server_cert, self.server_key, server=True, days=days)

    def server_names(self) -> list[str]:
        """The names and addresses on the broker's certificate: what clients may dial it by."""
        cert = x509.load_pem_x509_certificate(self.server_cert.read_bytes())
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return []
        return [*names.get_values_for_type(x509.DNSName), *(str(a) for a in names.get_values_for_type(x509.IPAddress))]

    def issue_client(self, name: str, *, days: int = 825) -> tuple[Path, Path]:
        self._issue(name, [], self.client_cert(name), self.client_key(name), server=False, days=days)
        return self.client_cert(name), self.client_key(name)

    def _issue(self, common_name: str, hosts: list[str], cert_path: Path, key_path: Path, *, server: bool, days: int) -> None:
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        ca = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        if hosts:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        _write_key(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)

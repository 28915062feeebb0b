"""`flux-server make-cert`: a local certificate authority and a server certificate.

fal_client always speaks https, so a local server needs a certificate the client trusts. This
writes, into one folder:

    ca.pem          the local CA certificate (trust this one)
    ca-key.pem      its private key (0600; kept so that a later run signs with the same CA)
    server.pem      the server certificate: localhost, 127.0.0.1, ::1 and every --host
    server-key.pem  its private key (0600)
    bundle.pem      the system CAs (certifi) plus ca.pem, for SSL_CERT_FILE: https to the rest
                    of the internet keeps working in the same process

Running it again with other --host names reuses an existing CA, so clients that already trust
ca.pem keep working.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1"]
CA_DAYS = 3650
SERVER_DAYS = 825  # the longest validity that every mainstream TLS client accepts


@dataclass(frozen=True)
class CertPaths:
    ca: Path
    ca_key: Path
    cert: Path
    key: Path
    bundle: Path


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _load_or_create_ca(ca_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if ca_path.exists() and key_path.exists():
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey) and ca.not_valid_after_utc > _now() + dt.timedelta(
            days=SERVER_DAYS
        ):
            return ca, key
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "flux-server local CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"flux-server local CA {_now():%Y-%m-%d %H:%M}"),
        ]
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, key)
    ca_path.write_bytes(_pem(ca))
    return ca, key


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _system_ca_bundle() -> bytes:
    try:
        import certifi

        return Path(certifi.where()).read_bytes()
    except ImportError:
        cafile = ssl.get_default_verify_paths().cafile
        return Path(cafile).read_bytes() if cafile else b""


def make_certificates(out: Path, hosts: list[str]) -> CertPaths:
    """Write (or refresh) the CA, the server certificate and the bundle into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = CertPaths(
        ca=out / "ca.pem",
        ca_key=out / "ca-key.pem",
        cert=out / "server.pem",
        key=out / "server-key.pem",
        bundle=out / "bundle.pem",
    )
    ca, ca_key = _load_or_create_ca(paths.ca, paths.ca_key)

    names = list(dict.fromkeys([*LOOPBACK_NAMES, *hosts]))  # de-duplicated, order kept
    key = _new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san_entry(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(paths.key, key)
    paths.cert.write_bytes(_pem(cert))
    paths.bundle.write_bytes(_system_ca_bundle().rstrip(b"\n") + b"\n" + paths.ca.read_bytes())
    return paths


def usage_text(paths: CertPaths, hosts: list[str]) -> str:
    host = hosts[0] if hosts else "127.0.0.1"
    return f"""Wrote {paths.ca.parent}:
  ca.pem          local CA (trust this)      ca-key.pem      its key (keep private)
  server.pem      server certificate          server-key.pem  its key
  bundle.pem      system CAs + ca.pem
Names in the server certificate: {", ".join(dict.fromkeys([*LOOPBACK_NAMES, *hosts]))}

Serve HTTPS:
  FLUX_SSL_CERTFILE={paths.cert} FLUX_SSL_KEYFILE={paths.key} flux-server serve
  (or --ssl-certfile {paths.cert} --ssl-keyfile {paths.key})

Python fal_client (always https):
  export SSL_CERT_FILE={paths.bundle}
  export FAL_QUEUE_RUN_HOST={host}:8000 FAL_RUN_HOST={host}:8000/run FAL_KEY=<your key>

Node @fal-ai/client:
  export NODE_EXTRA_CA_CERTS={paths.ca}

curl:
  curl --cacert {paths.ca} https://{host}:8000/health
"""


def make_cert_command(args: argparse.Namespace) -> int:
    hosts = [h.strip() for h in args.host if h.strip()]
    try:
        paths = make_certificates(Path(args.out), hosts)
    except OSError as exc:
        print(f"flux-server make-cert: {exc}", file=sys.stderr)
        return 1
    print(usage_text(paths, hosts))
    return 0

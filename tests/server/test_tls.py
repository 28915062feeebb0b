"""make-cert: a CA and a server certificate that real TLS clients accept for loopback names."""

from __future__ import annotations

import argparse
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import certifi
import pytest
from cryptography import x509

from server.supervisor.cli import main as cli_main
from server.tls import CertPaths, make_certificates


@contextmanager
def tls_server(paths: CertPaths) -> Iterator[int]:
    """A TLS listener on 127.0.0.1 that completes handshakes with the server certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(paths.cert, paths.key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"hello")
            except (ssl.SSLError, OSError):
                pass  # the client refused our certificate

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        thread.join()
        listener.close()


def handshake(port: int, server_hostname: str, cafile: Path | None) -> bytes:
    context = ssl.create_default_context(cafile=str(cafile) if cafile else certifi.where())
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        return tls.recv(5)


@pytest.fixture
def paths(tmp_path: Path) -> CertPaths:
    return make_certificates(tmp_path / "certs", ["flux.example.lan", "10.0.0.7"])


def test_server_certificate_is_trusted_for_loopback_and_extra_names(paths: CertPaths) -> None:
    with tls_server(paths) as port:
        for name in ("127.0.0.1", "localhost", "flux.example.lan", "10.0.0.7"):
            assert handshake(port, name, paths.ca) == b"hello"
        # bundle.pem (system CAs + ours) works too: that is what SSL_CERT_FILE points at.
        assert handshake(port, "127.0.0.1", paths.bundle) == b"hello"


def test_certificate_is_refused_without_the_ca_or_for_other_names(paths: CertPaths) -> None:
    with tls_server(paths) as port:
        with pytest.raises(ssl.SSLCertVerificationError):
            handshake(port, "127.0.0.1", None)
        with pytest.raises(ssl.SSLCertVerificationError, match=r"match"):
            handshake(port, "other.example.lan", paths.ca)


def test_files_keys_and_bundle(paths: CertPaths) -> None:
    for key in (paths.ca_key, paths.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(paths.ca.read_bytes())
    server = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.issuer == ca.subject
    bundle = paths.bundle.read_bytes()
    assert bundle.endswith(paths.ca.read_bytes())
    assert Path(certifi.where()).read_bytes().strip() in bundle


def test_second_run_keeps_the_ca_and_adds_names(paths: CertPaths) -> None:
    ca_before = paths.ca.read_bytes()
    again = make_certificates(paths.ca.parent, ["gpu-box.lan"])
    assert again.ca.read_bytes() == ca_before
    server = x509.load_pem_x509_certificate(again.cert.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "gpu-box.lan" in names.get_values_for_type(x509.DNSName)
    with tls_server(again) as port:
        assert handshake(port, "gpu-box.lan", paths.ca) == b"hello"


def test_make_cert_command_prints_how_to_use_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c"
    assert cli_main(["make-cert", "--out", str(out), "--host", "box.lan"]) == 0
    text = capsys.readouterr().out
    assert f"SSL_CERT_FILE={out / 'bundle.pem'}" in text
    assert f"NODE_EXTRA_CA_CERTS={out / 'ca.pem'}" in text
    assert "FLUX_SSL_CERTFILE=" in text and "FLUX_SSL_KEYFILE=" in text
    assert (out / "server.pem").is_file() and (out / "server-key.pem").is_file()


def test_make_cert_command_reports_unwritable_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    from server.tls import make_cert_command

    assert make_cert_command(argparse.Namespace(out=str(blocker / "sub"), host=[])) == 1

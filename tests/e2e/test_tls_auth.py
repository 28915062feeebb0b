"""TLS as served by `flux-server serve --ssl-certfile/--ssl-keyfile`, and API keys end to end."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import subprocess

import certifi
import httpx
import pytest
from cryptography import x509
from e2e_support import AUTH_KEY, DEV, small_input

pytestmark = pytest.mark.timeout(180)


def test_server_presents_a_certificate_for_127_0_0_1_signed_by_the_ca(flux_server) -> None:
    context = ssl.create_default_context(cafile=str(flux_server.certs.ca))
    with (
        socket.create_connection(("127.0.0.1", flux_server.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    presented = x509.load_der_x509_certificate(der)
    ca = x509.load_pem_x509_certificate(flux_server.certs.ca.read_bytes())
    presented.verify_directly_issued_by(ca)  # raises if another key signed it
    names = presented.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)


def test_https_works_with_the_bundle_and_fails_verification_without_it(flux_server) -> None:
    bundle = ssl.create_default_context(cafile=str(flux_server.certs.bundle))
    with httpx.Client(verify=bundle) as client:
        assert client.get(f"{flux_server.base_url}/health").status_code == 200
    # The system CAs alone (explicitly: SSL_CERT_FILE may point at the bundle in this process).
    system_only = ssl.create_default_context(cafile=certifi.where())
    with httpx.Client(verify=system_only) as client, pytest.raises(httpx.ConnectError, match="VERIFY_FAILED"):
        client.get(f"{flux_server.base_url}/health")
    curl = shutil.which("curl")
    assert curl is not None
    argv = [curl, "-sS", "--cacert", certifi.where(), f"{flux_server.base_url}/health"]
    refused = subprocess.run(argv, capture_output=True, timeout=30)
    assert refused.returncode == 60  # curl: peer certificate cannot be authenticated


def test_plain_http_to_the_tls_port_gets_no_answer(flux_server) -> None:
    with httpx.Client() as client, pytest.raises(httpx.HTTPError):
        client.get(f"http://127.0.0.1:{flux_server.port}/health")


def test_fal_client_with_the_right_and_a_wrong_key(auth_server, fal, monkeypatch: pytest.MonkeyPatch) -> None:
    import fal_client.client

    hostport = f"127.0.0.1:{auth_server.port}"
    monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", f"https://{hostport}/run/")
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"https://{hostport}/")
    output = fal.module.SyncClient(key=AUTH_KEY).run(DEV, small_input(seed=77))
    assert output["seed"] == 77
    with pytest.raises(fal.module.FalClientHTTPError) as caught:
        fal.module.SyncClient(key="not-the-key").submit(DEV, small_input())
    assert caught.value.status_code == 401

"""`flux-server health` (the container's HEALTHCHECK) against a real API on loopback."""

from __future__ import annotations

from server.supervisor.cli import main
from tests.server.conftest import api_settings, run_api_server


def test_health_command_follows_the_health_route(tmp_path, capsys) -> None:
    with run_api_server(api_settings(tmp_path)) as api:
        port = api.base_url.rsplit(":", 1)[1]
        assert main(["health", "--port", port]) == 1  # no worker registered yet: 503
        assert "503" in capsys.readouterr().err
        api.worker.set_worker_state("w0", "ready", device="cpu", model="tiny")
        assert main(["health", "--port", port]) == 0
    assert main(["health", "--port", port]) == 1  # nobody listens any more

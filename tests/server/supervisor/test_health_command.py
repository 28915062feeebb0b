"""`flux-server health` (the container's HEALTHCHECK) against a real API on loopback: liveness
by default, readiness with `--ready`."""

from __future__ import annotations

import pytest

from server.supervisor.cli import main
from tests.server.conftest import api_settings, run_api_server


def test_health_command_asks_liveness_and_with_ready_readiness(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    with run_api_server(api_settings(tmp_path)) as api:
        port = api.base_url.rsplit(":", 1)[1]
        assert main(["health", "--port", port]) == 0  # alive, though no worker is ready
        assert main(["health", "--port", port, "--ready"]) == 1  # no worker registered yet: 503
        err = capsys.readouterr().err
        assert "503" in err and "no worker has registered yet" in err
        api.worker.set_worker_state("w0", "ready", device="cpu", model="tiny")
        assert main(["health", "--port", port, "--ready"]) == 0
    assert main(["health", "--port", port]) == 1  # nobody listens any more
    assert "flux-server health: ConnectError" in capsys.readouterr().err

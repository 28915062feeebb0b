"""The logs of a real `flux-server serve`: one line per request lifecycle event with its id,
endpoint and timings; `--log-format json` for log shippers; no third-party warning walls."""

from __future__ import annotations

import json

from e2e_support import DEV, small_input, submit, wait_completed

from tests.support import wait_until


def test_text_logs_have_one_line_per_lifecycle_event(flux_server) -> None:
    with flux_server.client() as client:
        request_id = submit(client, DEV, small_input(seed=21))["request_id"]
        wait_completed(client, request_id)
    lines = wait_until(
        lambda: (
            [line for line in flux_server.log().splitlines() if request_id in line and "completed" in line]
            and [line for line in flux_server.log().splitlines() if request_id in line]
        ),
        30,
        "the completed line",
    )
    events = [
        next(word for word in ("submitted", "started", "completed") if f": {word} " in line) for line in lines
    ]
    # Two processes write these lines (API, worker): a worker may log its start first.
    assert sorted(events) == ["completed", "started", "submitted"], lines
    assert all(DEV in line for line in lines)
    assert all(" tenant=default" in line for line in lines)  # no named key: the default tenant
    (completed,) = [line for line in lines if ": completed " in line]
    assert "inference_seconds=" in completed and "total_seconds=" in completed and "images=1" in completed


def test_json_logs_and_a_quiet_start(start_flux_server) -> None:
    server = start_flux_server(args=["--log-format", "json"], tls=False)
    with server.client() as client:
        request_id = submit(client, DEV, small_input(seed=22))["request_id"]
        wait_completed(client, request_id)

    def records() -> list[dict]:
        return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]

    mine = wait_until(
        lambda: (
            (found := [r for r in records() if r.get("request_id") == request_id])
            and any(r.get("event") == "completed" for r in found)
            and found
        ),
        30,
        "the completed event",
    )
    assert sorted(r["event"] for r in mine) == ["completed", "started", "submitted"]
    assert {r["process"] for r in mine} == {"api", "worker w0"}
    (completed,) = [r for r in mine if r["event"] == "completed"]
    assert completed["inference_seconds"] > 0 and completed["endpoint"] == DEV
    assert {r["tenant"] for r in mine} == {"default"}
    # Every log line is JSON; only the banner (stdout, for the person starting it) is not.
    log_lines = [line for line in server.log().splitlines() if line.strip()]
    other = [line for line in log_lines if not line.startswith("{")]
    assert all(not line.startswith(("INFO", "WARNING", "ERROR", "20")) for line in other), other
    # Start-up progress is reported; third-party warnings are not.
    messages = [r["message"] for r in records()]
    assert any(m.startswith("loading model") for m in messages)
    assert any(m.startswith("model loaded in") for m in messages)
    assert not any("Warning" in line for line in log_lines), [line for line in log_lines if "Warning" in line]

"""The real JavaScript client (@fal-ai/client 1.10.1, installed by scripts/setup.sh) under Node.

Node cannot be pointed at another host by configuration, so the two ways a studio uses work:
proxy mode (`proxyUrl: {url: BASE + "/api/fal/proxy", when: "always"}`, routed on the
`x-fal-target-url` header) and a `requestMiddleware` that rewrites fal's hosts to ours. Each
mode runs tests/e2e/js/flow.mjs once, which prints what the client returned and threw.
"""

from __future__ import annotations

import json

import pytest
from e2e_support import JS_DIR, check_output, run_node_script

pytestmark = pytest.mark.timeout(240)

CLIENT_PACKAGE = JS_DIR / "node_modules" / "@fal-ai" / "client" / "package.json"


def run_flow(server, mode: str) -> dict:
    return run_node_script(server, "flow.mjs", FAL_MODE=mode)


@pytest.fixture(scope="module", params=["proxy", "middleware"])
def flow(request: pytest.FixtureRequest, flux_server) -> dict:
    return run_flow(flux_server, request.param)


def test_installed_client_is_the_pinned_version() -> None:
    assert CLIENT_PACKAGE.is_file(), "run scripts/setup.sh to install @fal-ai/client"
    assert json.loads(CLIENT_PACKAGE.read_text())["version"] == "1.10.1"


def test_run_returns_data_and_the_request_id_header(flow: dict, flux_server) -> None:
    run = flow["run"]
    assert run["data"]["seed"] == 1
    assert len(run["requestId"]) >= 32  # taken from x-fal-request-id
    with flux_server.client() as client:
        check_output(client, run["data"])


def test_subscribe_polling_with_logs(flow: dict, flux_server) -> None:
    result = flow["subscribePolling"]
    assert result["data"]["seed"] == 2 and result["requestId"]
    statuses = [u["status"] for u in flow["pollingUpdates"]]
    assert statuses[-1] == "COMPLETED" and set(statuses) <= {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}
    messages = [entry["message"] for u in flow["pollingUpdates"] for entry in (u["logs"] or [])]
    assert any("step 3/3" in m for m in messages), messages
    with flux_server.client() as client:
        check_output(client, result["data"])


def test_subscribe_streaming(flow: dict, flux_server) -> None:
    result = flow["subscribeStreaming"]
    assert result["data"]["seed"] == 3 and result["requestId"]
    assert flow["streamingUpdates"][-1] == "COMPLETED"
    with flux_server.client() as client:
        check_output(client, result["data"])


def test_queue_submit_status_result_and_cancel_after_completion(flow: dict) -> None:
    submitted = flow["submitted"]
    assert submitted["status"] == "IN_QUEUE" and submitted["request_id"]
    assert flow["firstStatus"]["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    assert flow["finalStatus"]["status"] == "COMPLETED"
    assert flow["result"]["requestId"] == submitted["request_id"]
    assert flow["result"]["data"]["seed"] == 4
    cancel = flow["cancelFinished"]
    assert cancel["thrown"] and cancel["isApiError"] and cancel["status"] == 400
    assert cancel["body"] == {"status": "ALREADY_COMPLETED"}


def test_stream_done_is_the_full_output(flow: dict, flux_server) -> None:
    assert flow["streamEvents"] >= 1
    assert flow["streamDone"]["seed"] == 5
    with flux_server.client() as client:
        check_output(client, flow["streamDone"])


def test_validation_error_has_field_errors(flow: dict) -> None:
    error = flow["validation"]
    assert error["thrown"] and error["isValidationError"] and error["status"] == 422
    assert any("num_images" in item["loc"] for item in error["fieldErrors"]), error


def test_image_to_image_and_redux(flow: dict, flux_server) -> None:
    with flux_server.client() as client:
        check_output(client, flow["imageToImage"]["data"], size=(96, 64))
        check_output(client, flow["redux"]["data"])
        check_output(client, flow["reduxOldId"]["data"])
    assert flow["redux"]["data"]["seed"] == 8 and flow["reduxOldId"]["data"]["seed"] == 9

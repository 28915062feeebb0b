"""JS client proxy mode: /api/fal/proxy routed on x-fal-target-url."""

from __future__ import annotations

import threading

from server.api.protocols.fal.proxy import local_target

PROXY = "/api/fal/proxy"


def target(url: str) -> dict:
    # What @fal-ai/client sends: the real URL in the header, JSON content type even on GET.
    return {"x-fal-target-url": url, "content-type": "application/json"}


def test_local_target_mapping():
    assert local_target("https://queue.fal.run/fal-ai/flux/dev") == ("/fal-ai/flux/dev", "")
    assert local_target("https://queue.fal.run/fal-ai/flux/requests/x/status?logs=0") == (
        "/fal-ai/flux/requests/x/status",
        "logs=0",
    )
    assert local_target("https://fal.run/fal-ai/flux/dev/stream") == ("/run/fal-ai/flux/dev/stream", "")
    # fal's REST host: only the storage routes (uploads) exist here.
    assert local_target("https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3") == (
        "/storage/upload/initiate",
        "storage_type=fal-cdn-v3",
    )
    assert local_target("https://rest.fal.ai/fal-ai/flux/dev") is None
    assert local_target("https://evil.example/fal-ai/flux/dev") is None
    assert local_target("https://queue.fal.run/") is None


def test_proxy_queue_flow(api):
    submitted = api.client.post(
        PROXY, json={"prompt": "proxied"}, headers=target("https://queue.fal.run/fal-ai/flux/dev")
    )
    assert submitted.status_code == 200
    request_id = submitted.json()["request_id"]
    assert submitted.headers["x-fal-request-id"] == request_id
    assert api.worker.get(request_id).job.prompt == "proxied"

    status = api.client.get(
        PROXY, headers=target(f"https://queue.fal.run/fal-ai/flux/requests/{request_id}/status?logs=1")
    )
    assert status.status_code == 202 and status.json()["status"] == "IN_QUEUE"
    api.complete(api.claim(request_id))
    result = api.client.get(PROXY, headers=target(f"https://queue.fal.run/fal-ai/flux/requests/{request_id}"))
    assert result.status_code == 200 and result.json()["prompt"] == "proxied"
    assert result.headers["x-fal-request-id"] == request_id
    cancel = api.client.put(
        PROXY, headers=target(f"https://queue.fal.run/fal-ai/flux/requests/{request_id}/cancel")
    )
    assert (cancel.status_code, cancel.json()) == (400, {"status": "ALREADY_COMPLETED"})


def test_proxy_headers_reach_the_routes(api):
    headers = target("https://queue.fal.run/fal-ai/flux-1/dev") | {"x-fal-queue-priority": "low"}
    request_id = api.client.post(PROXY, json={"prompt": "p"}, headers=headers).json()["request_id"]
    assert api.worker.get(request_id).job.priority == "low"
    assert api.worker.get(request_id).job.app_id == "fal-ai/flux-1"


def test_proxy_run_target(api):
    box: dict = {}

    def run() -> None:
        box["response"] = api.client.post(
            PROXY, json={"prompt": "run"}, headers=target("https://fal.run/fal-ai/flux/dev")
        )

    thread = threading.Thread(target=run)
    thread.start()
    record = api.claim()
    api.complete(record)
    thread.join(10)
    assert box["response"].status_code == 200 and box["response"].json()["prompt"] == "run"

    def stream() -> None:
        box["stream"] = api.client.post(
            PROXY, json={"prompt": "stream"}, headers=target("https://fal.run/fal-ai/flux/dev/stream")
        )

    thread = threading.Thread(target=stream)
    thread.start()
    api.complete(api.claim())
    thread.join(10)
    response = box["stream"]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert '"prompt": "stream"' in response.text.strip().splitlines()[-1]


def test_proxy_rejects_missing_or_foreign_targets(api):
    missing = api.client.post(PROXY, json={"prompt": "p"})
    assert missing.status_code == 400 and missing.json() == {"detail": "Invalid request"}
    foreign = api.client.post(
        PROXY, json={"prompt": "p"}, headers=target("https://example.com/fal-ai/flux/dev")
    )
    assert foreign.status_code == 400
    rest = api.client.post(PROXY, json={"prompt": "p"}, headers=target("https://rest.fal.ai/fal-ai/flux/dev"))
    assert rest.status_code == 400  # of fal's REST host only the storage routes are served
    assert (
        api.client.delete(PROXY, headers=target("https://queue.fal.run/fal-ai/flux/dev")).status_code == 405
    )
    assert api.worker.depth() == 0

"""A BFL-style client against a running flux-server: submit with x-key, poll `polling_url`
until Ready, download `result.sample`; validation, unknown ids and content moderation."""

from __future__ import annotations

import io
import time
from pathlib import Path

import httpx
from PIL import Image

from models.tiny import build_tiny_safety_checker

SMALL = {"width": 256, "height": 256, "steps": 2, "seed": 5}


def poll(client: httpx.Client, polling_url: str, timeout: float = 120.0) -> tuple[dict, list[str]]:
    """What BFL's clients do: GET polling_url until the status is final."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(polling_url).json()
        seen.append(body["status"])
        if body["status"] not in ("Pending",):
            return body, seen
        assert 0 <= body["progress"] <= 1
        time.sleep(0.2)
    raise AssertionError(f"still pending after {timeout} s: {seen[-3:]}")


def test_submit_poll_download(flux_server) -> None:
    with httpx.Client(
        verify=flux_server.verify, headers={"x-key": "any", "accept": "application/json"}
    ) as client:
        submitted = client.post(
            f"{flux_server.base_url}/v1/flux-dev",
            json={"prompt": "a red barn", **SMALL, "output_format": "png"},
        )
        assert submitted.status_code == 200, submitted.text
        body = submitted.json()
        assert body["polling_url"] == f"{flux_server.base_url}/v1/get_result?id={body['id']}"

        final, _ = poll(client, body["polling_url"])
        assert final["status"] == "Ready", final
        assert final["progress"] == 1.0
        result = final["result"]
        assert result["seed"] == 5 and result["prompt"] == "a red barn"
        assert result["end_time"] >= result["start_time"] and result["duration"] >= 0
        assert final["details"]["safety"] == "unchecked"

        sample = client.get(result["sample"])
        assert sample.status_code == 200 and sample.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(sample.content)).size == (256, 256)

        # Older clients call get_result on the base URL with the id.
        again = client.get(f"{flux_server.base_url}/v1/get_result", params={"id": body["id"]}).json()
        assert again["status"] == "Ready" and again["result"]["sample"] == result["sample"]


def test_invalid_size_and_unknown_id(flux_server) -> None:
    with httpx.Client(verify=flux_server.verify, headers={"x-key": "any"}) as client:
        bad = client.post(f"{flux_server.base_url}/v1/flux-dev", json={"prompt": "x", "width": 1000})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"] == ["body", "width"]
        unknown = client.get(f"{flux_server.base_url}/v1/get_result", params={"id": "no-such-task"})
        assert unknown.status_code == 200 and unknown.json()["status"] == "Task not found"


def test_flagged_image_is_content_moderated(start_flux_server, tmp_path: Path) -> None:
    checker = build_tiny_safety_checker(tmp_path / "always-flag", flag=True)
    server = start_flux_server(args=["--safety-checker", str(checker)], tls=False)
    with httpx.Client(headers={"x-key": "any"}) as client:
        submitted = client.post(
            f"{server.base_url}/v1/flux-dev", json={"prompt": "x", **SMALL, "safety_tolerance": 6}
        ).json()
        final, _ = poll(client, submitted["polling_url"])
    assert final["status"] == "Content Moderated", final
    assert final["result"] is None and final["details"]["safety_tolerance"] == 6

"""`/openapi.json` describes the real surface; `/docs` and `/redoc` load only this server's
assets (air-gapped). The same pages in a real browser: tests/e2e/test_browser_pages.py."""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit

from server.api.protocols.fal import endpoints as fal_endpoints


def test_fal_dev_schema_lists_image_size_acceleration_and_their_enums(api) -> None:
    schema = api.client.get("/openapi.json").json()
    submit = schema["paths"]["/fal-ai/flux/dev"]["post"]
    assert submit["operationId"] == "fal_submit_fal_ai_flux_dev"
    ref = submit["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    properties = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]
    image_size_enums = [item["enum"] for item in properties["image_size"]["anyOf"] if "enum" in item]
    assert image_size_enums and "landscape_4_3" in image_size_enums[0] and "square_hd" in image_size_enums[0]
    assert any("$ref" in item for item in properties["image_size"]["anyOf"])  # or {width, height}
    acceleration = [item["enum"] for item in properties["acceleration"]["anyOf"] if "enum" in item]
    assert acceleration == [["none", "regular", "high"]]
    assert {"422", "401", "413"} <= set(submit["responses"])


def test_every_endpoint_of_the_fal_app_table_is_documented_with_stable_ids(api) -> None:
    schema = api.client.get("/openapi.json").json()
    paths = schema["paths"]
    for app_id, endpoints in fal_endpoints.APPS.items():
        for endpoint in endpoints:
            path_id = f"{app_id}/{endpoint}" if endpoint else app_id  # "": fal-ai/flux-lora itself
            for path in (f"/{path_id}", f"/run/{path_id}", f"/run/{path_id}/stream"):
                assert "post" in paths[path], path
        base = f"/{app_id}/requests/{{request_id}}"
        assert (
            {"get"} == set(paths[f"{base}/status"]) == set(paths[f"{base}/status/stream"]) == set(paths[base])
        )
        assert "put" in paths[f"{base}/cancel"]
    ids = [operation["operationId"] for item in paths.values() for operation in item.values()]
    assert len(ids) == len(set(ids))
    assert {"bfl_flux_dev", "bfl_get_result", "openai_create_image", "openai_edit_image", "health"} <= set(
        ids
    )
    # The pattern routes themselves are not in the document.
    assert not any("{owner}" in path for path in paths)
    assert schema == api.client.get("/openapi.json").json()  # the same document every time


def test_bfl_and_openai_routes_document_their_error_shapes(api) -> None:
    schema = api.client.get("/openapi.json").json()
    bfl = schema["paths"]["/v1/flux-dev"]["post"]
    assert {"401", "403", "413", "422"} <= set(bfl["responses"])
    openai = schema["paths"]["/v1/images/generations"]["post"]
    assert {"400", "401", "413"} <= set(openai["responses"])
    ref = openai["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
    assert "error" in schema["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]


def linked_urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href|url)\s*[=:(]\s*["']([^"']+)["']""", html)


def test_docs_pages_link_only_this_server(api) -> None:
    for page in ("/docs", "/redoc"):
        response = api.client.get(page)
        assert response.status_code == 200 and "text/html" in response.headers["content-type"]
        urls = linked_urls(response.text)
        assert urls, page
        for url in urls:
            absolute = urljoin(api.base_url + page, url)
            assert urlsplit(absolute).netloc == urlsplit(api.base_url).netloc, (page, url)
            assert api.client.get(absolute).status_code == 200, (page, url)

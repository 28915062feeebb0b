"""`GET /.well-known/jwks.json`: the public key that signs our fal webhooks.

Receivers verify `X-Fal-Webhook-Signature` against these keys, exactly as they do against
fal's own JWKS (see docs/webhooks.md).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.api.webhooks.keys import jwks, load_or_create_private_key

router = APIRouter()


@router.get("/.well-known/jwks.json", include_in_schema=False)
async def get_jwks(request: Request) -> JSONResponse:
    key = load_or_create_private_key(request.app.state.settings.data_dir)
    # Receivers cache JWKS (fal's verifiers: up to 24 h); the key never changes.
    return JSONResponse(jwks([key.public_key()]), headers={"Cache-Control": "public, max-age=3600"})

"""The admin endpoints' credentials: ``Authorization: Bearer <MTRANK_ADMIN_TOKEN>`` (RFC 6750; the
scheme name is case-insensitive, RFC 9110 §11.1)."""

from __future__ import annotations

import hmac


def bearer_token(authorization: str | None) -> str | None:
    """The token of a ``Bearer`` ``Authorization`` header; None for no header, another scheme or
    a bare token."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def is_admin(authorization: str | None, admin_token: str) -> bool:
    """Whether the header carries ``admin_token`` as a bearer token (compared in constant time)."""
    given = bearer_token(authorization)
    return given is not None and hmac.compare_digest(given.encode(), admin_token.encode())

"""Bearer-token auth between callers and services: one token per caller, constant-time comparison."""
from __future__ import annotations

import functools
import hmac
from typing import Callable, Iterable, Mapping, TypeVar

from flask import g, request

from .errors import Forbidden, Unauthorized
from .settings import Secret

F = TypeVar("F", bound=Callable[..., object])

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})


def identify_caller(header: str | None, tokens: Mapping[str, Secret]) -> str:
    """Return the caller whose token matches the Authorization header, or raise Unauthorized."""
    if not header:
        raise Unauthorized("missing Authorization header; send 'Authorization: Bearer <token>'")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise Unauthorized("Authorization must use the Bearer scheme")
    presented_b = presented.strip().encode()
    found: str | None = None
    # Compare against every token so timing does not reveal which caller matched.
    for caller, secret in tokens.items():
        if hmac.compare_digest(presented_b, secret.get().encode()):
            found = caller
    if found is None:
        raise Unauthorized("invalid bearer token")
    return found


def install_auth(app_tokens: Callable[[], Mapping[str, Secret]], public: Iterable[str] = PUBLIC_PATHS) -> Callable[[], None]:
    """A before_request hook that authenticates every non-public path and sets g.caller."""
    public_set = frozenset(public)

    def _before() -> None:
        if request.path in public_set:
            g.caller = None
            return
        g.caller = identify_caller(request.headers.get("Authorization"), app_tokens())

    return _before


def require_caller(*callers: str) -> Callable[[F], F]:
    """Restrict an endpoint to named callers (e.g. decisions from n8n only)."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: object, **kwargs: object) -> object:
            if g.get("caller") not in callers:
                raise Forbidden(f"caller {g.get('caller')!r} may not call this endpoint; allowed: {', '.join(callers)}")
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco

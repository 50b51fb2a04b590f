"""Bearer-token access control: a pure-ASGI middleware and the route -> scope table.

The policy (scopes ``open``, ``inference`` and ``admin``, what is open without tokens, and
why) is the README's "Access control"; ``AuthPolicy.refusal`` decides it for HTTP and gRPC.
Unmatched paths need the inference scope, so a 404 tells an unauthenticated client nothing.

Tokens are kept only as SHA-256 digests, looked up in a dict: the lookup's timing
depends on the digest of what the client sent, never on how many characters of a
real token it guessed, which is what a constant-time comparison is for. A token
is never logged; configuration errors name the setting and the line, not the token.

The middleware sits outside the inference fast path, so it covers it and FastAPI
alike; on an open route, or when no token is configured, it costs one dict lookup.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from model_server.settings import Settings

from .errors import error_response
from .middleware import HEALTH_PATHS

# RFC 6750's b64token: what a bearer token may contain (no spaces, commas or quotes).
_TOKEN_CHARS = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
MIN_TOKEN_LENGTH = 16

OPEN_PATHS = HEALTH_PATHS | {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
METRICS_PATH = "/metrics"
SECURITY_SCHEME = "bearerAuth"
_CHALLENGE = 'Bearer realm="model-server"'  # WWW-Authenticate of a 401
_ADMIN_DISABLED = (
    "admin endpoints are off: this server listens on a non-loopback address and has no admin "
    "tokens; set MODEL_SERVER_ADMIN_TOKENS (or MODEL_SERVER_ADMIN_TOKENS_FILE), or "
    "MODEL_SERVER_ALLOW_UNAUTHENTICATED_ADMIN=true behind a gateway that checks access"
)


class AuthScope(enum.Enum):
    OPEN = "open"
    INFERENCE = "inference"
    ADMIN = "admin"


class TokenConfigError(ValueError):
    """A token setting cannot be used; the message names the setting, never a token."""


def route_scope(method: str, path: str, metrics_require_auth: bool = False) -> AuthScope:
    """The scope a request needs. Also works on route templates (``/v1/models/{model_id}/{version}``).

    Admin paths are matched by prefix and suffix rather than exact segments: a path that
    looks like an admin path but matches no route is classified admin too, which is
    only ever stricter.
    """
    if len(path) > 1 and path.endswith("/"):
        path = path.rstrip("/")  # Starlette redirects "/x/" to "/x": classify it as "/x"
    if path in OPEN_PATHS:
        return AuthScope.OPEN
    if path == METRICS_PATH:
        return AuthScope.INFERENCE if metrics_require_auth else AuthScope.OPEN
    return AuthScope.ADMIN if _is_admin(method, path) else AuthScope.INFERENCE


_ADMIN_POSTS = frozenset({"/v1/models/load", "/v2/systemsharedmemory/unregister"})


def _is_admin(method: str, path: str) -> bool:
    if method == "POST":
        return (
            path in _ADMIN_POSTS
            or (path.startswith("/v2/repository/models/") and path.endswith(("/load", "/unload")))
            or (
                path.startswith("/v2/systemsharedmemory/region/")
                and path.endswith(("/register", "/unregister"))
            )
        )
    return method == "DELETE" and path.startswith("/v1/models/")


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, ``localhost``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def _check_token(token: str, where: str) -> str:
    if len(token) < MIN_TOKEN_LENGTH:
        raise TokenConfigError(
            f"{where}: a token must have at least {MIN_TOKEN_LENGTH} characters (e.g. `openssl rand -hex 32`)"
        )
    if not _TOKEN_CHARS.match(token):
        raise TokenConfigError(f"{where}: a token may contain only letters, digits and -._~+/ (then =)")
    return token


def _read_token_file(path: Path, setting: str) -> list[str]:
    """One token per line; blank lines and lines starting with ``#`` are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenConfigError(f"{setting}: cannot read {path}: {type(exc).__name__}") from None
    tokens = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            tokens.append(_check_token(line, f"{setting} line {number}"))
    if not tokens:
        raise TokenConfigError(f"{setting}: {path} holds no token")
    return tokens


def _tokens(settings: Settings, name: str) -> list[str]:
    """The ``name`` ("admin" or "inference") tokens of the setting, then of the token file, checked."""
    env = f"MODEL_SERVER_{name.upper()}_TOKENS"
    tokens = [
        _check_token(secret.get_secret_value(), f"{env} item {i}")
        for i, secret in enumerate(getattr(settings, f"{name}_tokens"), 1)
    ]
    path: Path | None = getattr(settings, f"{name}_tokens_file")
    if path is not None:
        tokens += _read_token_file(path, f"{env}_FILE")
    return tokens


def load_tokens(settings: Settings) -> tuple[list[str], list[str]]:
    """(admin tokens, inference tokens) from the settings and the token files, checked."""
    admin, inference = _tokens(settings, "admin"), _tokens(settings, "inference")
    if settings.metrics_require_auth and not inference:
        raise TokenConfigError(
            "MODEL_SERVER_METRICS_REQUIRE_AUTH needs inference tokens "
            "(MODEL_SERVER_INFERENCE_TOKENS or MODEL_SERVER_INFERENCE_TOKENS_FILE)"
        )
    return admin, inference


class AuthPolicy:
    """Which tokens exist and what each scope requires; built once per process."""

    def __init__(self, settings: Settings) -> None:
        admin, inference = load_tokens(settings)
        self.known: dict[bytes, AuthScope] = {_digest(t.encode()): AuthScope.INFERENCE for t in inference}
        self.known.update({_digest(t.encode()): AuthScope.ADMIN for t in admin})
        self.inference_open = not inference
        # No admin tokens: admin routes are as open as inference routes, on loopback or when allowed.
        self.admin_disabled = not admin and not (
            is_loopback(settings.host) or settings.allow_unauthenticated_admin
        )
        self.admin_needs_inference = not admin and not self.admin_disabled
        self.admin_open = self.admin_needs_inference and self.inference_open
        self.metrics_require_auth = settings.metrics_require_auth
        # Nothing to check at all (loopback, no tokens: `make serve`): the middleware steps aside.
        self.all_open = self.inference_open and self.admin_open

    def is_open(self, scope: AuthScope) -> bool:
        if scope is AuthScope.OPEN:
            return True
        if scope is AuthScope.INFERENCE:
            return self.inference_open
        return self.admin_open

    def refusal(self, needed: AuthScope, authorization: bytes | None) -> tuple[int, str, str, str] | None:
        """(status, code, message, WWW-Authenticate) refusing a request that needs ``needed`` with
        this ``Authorization`` value (HTTP header or gRPC metadata), or None to let it in."""
        if self.is_open(needed):
            return None
        held: AuthScope | None = None
        if authorization is not None:
            scheme, _, token = authorization.partition(b" ")
            token = token.strip()
            if scheme.lower() == b"bearer" and token:
                held = self.known.get(_digest(token))
        if needed is AuthScope.ADMIN and self.admin_disabled and (held is not None or self.inference_open):
            return 403, "admin_disabled", _ADMIN_DISABLED, ""
        if held is None and authorization is not None:
            return 401, "unauthorized", "invalid bearer token", f'{_CHALLENGE}, error="invalid_token"'
        if held is None:
            message = "missing bearer token: send the header `Authorization: Bearer <token>`"
            return 401, "unauthorized", message, _CHALLENGE
        if needed is AuthScope.ADMIN and held is not AuthScope.ADMIN and not self.admin_needs_inference:
            return 403, "forbidden", "this token does not have the admin scope", ""
        return None


class AuthMiddleware:
    """Answers 401/403 before the request reaches the fast path or FastAPI."""

    def __init__(self, app: ASGIApp, policy: AuthPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        policy = self.policy
        problem = None
        if not policy.all_open and scope["type"] == "http":
            needed = route_scope(scope["method"], scope["path"], policy.metrics_require_auth)
            if not policy.is_open(needed):  # an open route costs no scan of the headers
                given = next((value for name, value in scope["headers"] if name == b"authorization"), None)
                problem = policy.refusal(needed, given)
        if problem is None:
            await self.app(scope, receive, send)
            return
        status, code, message, challenge = problem
        response = error_response(scope["path"], status, code, message)
        if challenge:
            response.headers["WWW-Authenticate"] = challenge
        await response(scope, receive, send)


_AUTH_ANSWERS = {
    "401": "Missing or invalid bearer token.",
    "403": "The token lacks the admin scope, or admin is off.",
}


def install_openapi(app: FastAPI, policy: AuthPolicy) -> None:
    """Adds the bearer scheme and the 401/403 answers to the OpenAPI document (built once, on demand).

    Every operation that is not open lists the scheme, so `/docs` offers "Authorize" and
    sends the token; an operation whose scope is open in this configuration also lists
    the empty requirement (the token is optional). Nothing here runs per request.
    """
    build: Callable[[], dict[str, Any]] = app.openapi

    @functools.cache
    def openapi() -> dict[str, Any]:
        schema = build()
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
            "type": "http",
            "scheme": "bearer",
            "description": "A token of MODEL_SERVER_INFERENCE_TOKENS or MODEL_SERVER_ADMIN_TOKENS "
            "(admin routes need an admin token).",
        }
        known_schemas = components.get("schemas", {})
        for path, operations in schema.get("paths", {}).items():
            model = "V2ErrorResponse" if path.startswith("/v2") else "ErrorResponse"
            for method, operation in operations.items():
                needed = route_scope(method.upper(), path, policy.metrics_require_auth)
                if not isinstance(operation, dict) or needed is AuthScope.OPEN:
                    continue
                security: list[dict[str, list[str]]] = [{SECURITY_SCHEME: []}]
                if policy.is_open(needed):
                    security.append({})
                operation["security"] = security
                body = (
                    {"$ref": f"#/components/schemas/{model}"}
                    if model in known_schemas
                    else {"type": "object"}
                )
                content = {"application/json": {"schema": body}}
                responses = operation.setdefault("responses", {})
                for status, description in _AUTH_ANSWERS.items():
                    responses.setdefault(status, {"description": description, "content": content})
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

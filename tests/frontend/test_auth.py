"""Access control in-process: the route -> scope table, the non-loopback default, token settings.

The real stack cannot listen on a non-loopback address in tests, so the secure default
is checked here against the ASGI app the frontend serves (``asgi_app``): the auth
middleware answers before anything needs the service, which is not started.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import iter_route_contexts

from frontend.app import asgi_app, create_app
from frontend.auth import AuthScope, TokenConfigError, is_loopback, load_tokens, route_scope
from model_server.settings import Settings

ADMIN = "admin-token-0123456789abcdef"
INFER = "infer-token-0123456789abcdef"

# Every route of the app and the scope it needs. A route added without an entry here fails
# test_every_route_is_in_the_table, so nobody adds an endpoint without deciding who may call it.
ROUTE_SCOPES: dict[tuple[str, str], AuthScope] = {
    ("GET", "/openapi.json"): AuthScope.OPEN,
    ("GET", "/docs"): AuthScope.OPEN,
    ("GET", "/docs/oauth2-redirect"): AuthScope.OPEN,
    ("GET", "/redoc"): AuthScope.OPEN,
    ("GET", "/health"): AuthScope.OPEN,
    ("GET", "/ready"): AuthScope.OPEN,
    ("GET", "/metrics"): AuthScope.OPEN,
    ("POST", "/v1/models/load"): AuthScope.ADMIN,
    ("GET", "/v1/models"): AuthScope.INFERENCE,
    ("GET", "/v1/models/{model_id}/{version}"): AuthScope.INFERENCE,
    ("DELETE", "/v1/models/{model_id}/{version}"): AuthScope.ADMIN,
    ("POST", "/v1/infer"): AuthScope.INFERENCE,
    ("GET", "/v2/health/live"): AuthScope.OPEN,
    ("GET", "/v2/health/ready"): AuthScope.OPEN,
    ("GET", "/v2"): AuthScope.INFERENCE,
    ("GET", "/v2/models/stats"): AuthScope.INFERENCE,
    ("GET", "/v2/models/{model}/stats"): AuthScope.INFERENCE,
    ("GET", "/v2/models/{model}/versions/{version}/stats"): AuthScope.INFERENCE,
    ("GET", "/v2/models/{model}"): AuthScope.INFERENCE,
    ("GET", "/v2/models/{model}/versions/{version}"): AuthScope.INFERENCE,
    ("GET", "/v2/models/{model}/ready"): AuthScope.INFERENCE,
    ("GET", "/v2/models/{model}/versions/{version}/ready"): AuthScope.INFERENCE,
    ("GET", "/v2/models/{model}/config"): AuthScope.INFERENCE,
    ("GET", "/v2/models/{model}/versions/{version}/config"): AuthScope.INFERENCE,
    ("POST", "/v2/models/{model}/infer"): AuthScope.INFERENCE,
    ("POST", "/v2/models/{model}/versions/{version}/infer"): AuthScope.INFERENCE,
    ("POST", "/v2/repository/index"): AuthScope.INFERENCE,
    ("POST", "/v2/repository/models/{model}/load"): AuthScope.ADMIN,
    ("POST", "/v2/repository/models/{model}/unload"): AuthScope.ADMIN,
    ("POST", "/v2/systemsharedmemory/region/{name}/register"): AuthScope.ADMIN,
    ("POST", "/v2/systemsharedmemory/region/{name}/unregister"): AuthScope.ADMIN,
    ("POST", "/v2/systemsharedmemory/unregister"): AuthScope.ADMIN,
    ("GET", "/v2/systemsharedmemory/status"): AuthScope.INFERENCE,
    ("GET", "/v2/systemsharedmemory/region/{name}/status"): AuthScope.INFERENCE,
}


def app_routes() -> set[tuple[str, str]]:
    """(method, path template) of every route of the real app (HEAD is GET's)."""
    found: set[tuple[str, str]] = set()
    for route in iter_route_contexts(create_app(Settings(host="127.0.0.1")).routes):
        assert route.path is not None
        for method in route.methods or ():
            if method != "HEAD":
                found.add((method, route.path))
    return found


def test_every_route_is_in_the_table() -> None:
    routes = app_routes()
    assert routes - ROUTE_SCOPES.keys() == set(), "routes without a scope in ROUTE_SCOPES"
    assert ROUTE_SCOPES.keys() - routes == set(), "ROUTE_SCOPES lists routes the app no longer has"


@pytest.mark.parametrize(("method", "path"), sorted(ROUTE_SCOPES))
def test_route_scope_matches_the_table(method: str, path: str) -> None:
    assert route_scope(method, path) is ROUTE_SCOPES[(method, path)]


def test_scope_edge_cases() -> None:
    assert route_scope("GET", "/metrics", metrics_require_auth=True) is AuthScope.INFERENCE
    # A trailing slash is redirected by Starlette to the path without it: same scope.
    assert route_scope("POST", "/v1/models/load/") is AuthScope.ADMIN
    assert route_scope("DELETE", "/v1/models/a/b/") is AuthScope.ADMIN
    # Paths no route has need the inference scope: a 404 is no oracle without a token.
    assert route_scope("GET", "/etc/passwd") is AuthScope.INFERENCE
    assert route_scope("POST", "/v2/repository/models/a/b/load") is AuthScope.ADMIN  # stricter, not looser


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("model-server.internal", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def call(
    settings: Settings, method: str, path: str, token: str | None = None, **kwargs: Any
) -> httpx.Response:
    """One request against the ASGI app uvicorn would serve (no lifespan: the service is not started)."""
    app = asgi_app(create_app(settings), settings)
    headers: dict[str, str] = kwargs.pop("headers", {})
    if token:
        headers["Authorization"] = f"Bearer {token}"

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.request(method, path, headers=headers, **kwargs)

    return asyncio.run(go())


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3"])
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/models/load"),
        ("DELETE", "/v1/models/fraud_detection/2.0.0"),
        ("POST", "/v2/repository/models/fraud_detection/load"),
        ("POST", "/v2/repository/models/fraud_detection/unload"),
        ("POST", "/v2/systemsharedmemory/region/r/register"),
        ("POST", "/v2/systemsharedmemory/unregister"),
    ],
)
def test_admin_is_off_on_a_non_loopback_host_without_admin_tokens(host: str, method: str, path: str) -> None:
    response = call(Settings(host=host), method, path, json={})
    assert response.status_code == 403
    message = response.json()["error"]
    message = message if isinstance(message, str) else message["message"]
    assert "MODEL_SERVER_ADMIN_TOKENS" in message
    assert "MODEL_SERVER_ALLOW_UNAUTHENTICATED_ADMIN" in message
    if path.startswith("/v1"):
        assert response.json()["error"]["code"] == "admin_disabled"
        assert response.json()["error"]["request_id"] == response.headers["x-request-id"]


def test_allow_unauthenticated_admin_lets_admin_through() -> None:
    settings = Settings(host="0.0.0.0", allow_unauthenticated_admin=True)
    response = call(settings, "POST", "/v1/models/load", json={})
    # Past access control: FastAPI's own validation answers (no model_id).
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


def test_non_loopback_with_inference_tokens_only() -> None:
    settings = Settings(host="0.0.0.0", inference_tokens=INFER)
    # No token: authentication comes first.
    assert call(settings, "POST", "/v1/models/load", json={}).status_code == 401
    # A valid inference token still cannot use admin routes nobody configured.
    assert call(settings, "POST", "/v1/models/load", INFER, json={}).status_code == 403


def test_admin_tokens_on_a_non_loopback_host() -> None:
    settings = Settings(host="0.0.0.0", admin_tokens=ADMIN, inference_tokens=INFER)
    missing = call(settings, "POST", "/v1/models/load", json={})
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="model-server"'
    assert missing.json()["error"]["code"] == "unauthorized"
    wrong = call(settings, "POST", "/v1/models/load", "not-a-token-at-all-0000", json={})
    assert wrong.status_code == 401
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
    forbidden = call(settings, "POST", "/v2/repository/models/m/load", INFER, json={})
    assert forbidden.status_code == 403
    assert forbidden.json() == {"error": "this token does not have the admin scope"}
    assert call(settings, "POST", "/v1/models/load", ADMIN, json={}).status_code == 422
    # Other schemes and malformed headers are no token.
    for header in (f"Basic {ADMIN}", "Bearer", "Bearer ", ADMIN):
        response = call(settings, "GET", "/v2/models/m", headers={"Authorization": header})
        assert response.status_code == 401, header
    # Probes stay open.
    assert call(settings, "GET", "/health").status_code == 200
    assert call(settings, "GET", "/v2/health/live").status_code == 200


def test_metrics_can_require_a_token() -> None:
    settings = Settings(host="127.0.0.1", inference_tokens=INFER, metrics_require_auth=True)
    assert call(settings, "GET", "/metrics").status_code == 401
    # The token passing is shown on the real stack (tests/integration/test_auth.py).
    with pytest.raises(TokenConfigError, match="MODEL_SERVER_INFERENCE_TOKENS"):
        load_tokens(Settings(metrics_require_auth=True, admin_tokens=ADMIN))


def test_token_files(tmp_path: Path) -> None:
    admin_file = tmp_path / "admin"
    admin_file.write_text(f"# rotated 2026-12\n{ADMIN}\n\n  {ADMIN}-next  \n")
    infer_file = tmp_path / "infer"
    infer_file.write_text(INFER + "\n")
    settings = Settings(
        host="0.0.0.0",
        admin_tokens_file=admin_file,
        inference_tokens_file=infer_file,
        inference_tokens=INFER + "x",
    )
    assert load_tokens(settings) == ([ADMIN, f"{ADMIN}-next"], [INFER + "x", INFER])
    assert call(settings, "POST", "/v1/models/load", f"{ADMIN}-next", json={}).status_code == 422
    assert call(settings, "POST", "/v1/models/load", INFER, json={}).status_code == 403


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("", "holds no token"),
        ("short\n", "at least 16"),
        ("has space inside it, too long\n", "may contain only"),
    ],
)
def test_bad_token_files_are_refused_without_echoing_the_token(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / "tokens"
    path.write_text(content)
    with pytest.raises(TokenConfigError, match=problem) as info:
        load_tokens(Settings(admin_tokens_file=path))
    assert "MODEL_SERVER_ADMIN_TOKENS_FILE" in str(info.value)
    if content.strip():
        assert content.strip() not in str(info.value)
    with pytest.raises(TokenConfigError, match="cannot read"):
        load_tokens(Settings(inference_tokens_file=tmp_path / "missing"))


def test_tokens_never_show_in_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_SERVER_ADMIN_TOKENS", f"{ADMIN}, {ADMIN}2")
    monkeypatch.setenv("MODEL_SERVER_INFERENCE_TOKENS", INFER)
    settings = Settings()
    assert [t.get_secret_value() for t in settings.admin_tokens] == [ADMIN, f"{ADMIN}2"]
    for text in (repr(settings), str(settings), settings.model_dump_json(), str(settings.model_dump())):
        assert ADMIN not in text and INFER not in text
    env = {**os.environ, "MODEL_SERVER_ADMIN_TOKENS": ADMIN, "MODEL_SERVER_INFERENCE_TOKENS": INFER}
    cli = [sys.executable, "-m", "model_server.cli", "settings"]
    out = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60, check=True)
    assert "MODEL_SERVER_ADMIN_TOKENS" in out.stdout
    assert ADMIN not in out.stdout + out.stderr and INFER not in out.stdout + out.stderr


def test_serve_refuses_a_bad_token_before_starting(tmp_path: Path) -> None:
    env = {**os.environ, "MODEL_SERVER_ADMIN_TOKENS": "tooshort", "MODEL_SERVER_RUN_DIR": str(tmp_path)}
    cli = [sys.executable, "-m", "model_server.cli", "serve"]
    out = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 3  # exitcodes.BOOT_ERROR
    assert "MODEL_SERVER_ADMIN_TOKENS item 1" in out.stderr and "tooshort" not in out.stderr


def test_openapi_documents_the_bearer_scheme() -> None:
    schema = call(Settings(host="127.0.0.1", admin_tokens=ADMIN), "GET", "/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    paths = schema["paths"]
    assert paths["/v1/models/load"]["post"]["security"] == [{"bearerAuth": []}]
    # Inference is open without inference tokens: the token is optional there.
    assert paths["/v2/models/{model}/infer"]["post"]["security"] == [{"bearerAuth": []}, {}]
    assert "security" not in paths["/health"]["get"]
    assert "security" not in paths["/v2/health/ready"]["get"]
    for operation in (paths["/v1/models/load"]["post"], paths["/v2/repository/models/{model}/load"]["post"]):
        assert {"401", "403"} <= operation["responses"].keys()
    assert paths["/v2/repository/models/{model}/load"]["post"]["responses"]["401"]["content"]


def test_cors_preflight_needs_no_token_and_a_401_is_readable_by_the_page() -> None:
    origin = "http://app.example.test"
    settings = Settings(host="127.0.0.1", inference_tokens=INFER, cors_origins=origin)
    preflight = call(
        settings,
        "OPTIONS",
        "/v2/models/m/infer",
        headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
    )
    # A browser sends no credentials on a preflight: it must not be refused.
    assert preflight.status_code == 200
    refused = call(settings, "POST", "/v2/models/m/infer", headers={"Origin": origin}, json={})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == origin


@pytest.mark.parametrize("given", ["x" * 129, "two words", "semi;colon", 'quote"d', "é"])
def test_a_client_request_id_outside_the_safe_charset_is_replaced(given: str) -> None:
    """The id goes into every log line of the request: only 1-128 chars of [A-Za-z0-9._:-] are kept."""
    settings = Settings(host="127.0.0.1")
    kept = call(settings, "GET", "/health", headers={"X-Request-ID": "req-1.a:b_c"})
    assert kept.headers["x-request-id"] == "req-1.a:b_c"
    replaced = call(settings, "GET", "/health", headers={"X-Request-ID": given.encode()})
    assert replaced.status_code == 200
    assert replaced.headers["x-request-id"] not in (given, "")
    assert re.fullmatch(r"[0-9a-f]+", replaced.headers["x-request-id"])

"""Keep secrets out of log lines and error bodies.

Two defences, both applied by :func:`redact`:

* URL userinfo (``https://user:token@host``) and credential-looking query
  parameters (``X-Amz-Signature=...``, ``token=...``) are masked by pattern;
* the credential values a source actually uses (the AWS secret key and session
  token boto3 resolved, the MLflow password/token) are registered with
  :func:`register_secret` and masked wherever they appear.

Every :class:`loader.errors.LoadError` message passes through :func:`redact`, and
the sources log URIs through it.
"""

from __future__ import annotations

import re
import threading

MASK = "***"
# Shorter values are not masked: they would mangle ordinary words.
MIN_SECRET_LEN = 8

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]+@")
_QUERY_SECRET = re.compile(
    r"(?i)(?P<key>[?&](?:x-amz-(?:signature|credential|security-token)|signature|sig|token|"
    r"access_token|password|secret|key)=)[^&\s\"']+"
)

_lock = threading.Lock()
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a credential value so that :func:`redact` masks it from now on."""
    if value and len(value) >= MIN_SECRET_LEN:
        with _lock:
            _secrets.add(value)


def has_credentials(uri: str) -> bool:
    """True when ``uri`` carries userinfo (``user:pw@``) or a secret-looking query parameter."""
    return strip_credentials(uri) != uri


def strip_credentials(uri: str) -> str:
    """``uri`` without userinfo and without the values of secret-looking query parameters.

    Applied to every ``registry_uri`` before it is stored, returned, logged or
    persisted (the coordinator refuses such URIs outright; this is the last line).
    """
    uri = _USERINFO.sub(lambda m: m.group("scheme"), uri)
    return _QUERY_SECRET.sub(lambda m: f"{m.group('key')}{MASK}", uri)


def redact(text: str) -> str:
    """``text`` with URL credentials and every registered secret replaced by ``***``."""
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m.group('key')}{MASK}", text)
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text

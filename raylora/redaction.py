"""What counts as a secret, and masking it: one rule for MLflow params, job submission output and logs.

A name containing token, key, secret, password or credential is a secret name (HF_TOKEN,
AWS_SECRET_ACCESS_KEY, model.token); the value of any environment variable with such a name is a secret
value, masked wherever it appears inside other text (a URL, a command line, an error message).
"""

from __future__ import annotations

import os
import re
from typing import Any

__all__ = ["REDACTED", "is_secret_name", "redact", "secret_values"]

REDACTED = "***"
_SECRET_NAME = re.compile(r"token|key|secret|password|passwd|credential", re.IGNORECASE)
# Credentials inside a URL (https://user:password@host/...).
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@")


def is_secret_name(name: str) -> bool:
    """Whether a config field or environment variable name looks like it holds a secret."""
    return bool(_SECRET_NAME.search(name))


def secret_values() -> list[str]:
    """Values of environment variables with secret names, longest first (so no secret is half-masked)."""
    return sorted(
        {v for k, v in os.environ.items() if is_secret_name(k) and v and len(v) >= 6},
        key=len,
        reverse=True,
    )


def redact(value: Any, *, secrets: list[str] | None = None) -> Any:
    """A copy of `value` with secrets replaced by `***`.

    Dict entries whose key names a secret lose their value; any string containing the value of a secret
    environment variable has that value masked, wherever it appears (a URL, a command line, a path), and
    so does the password part of a URL.
    """
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, dict):
        return {
            k: (
                REDACTED
                if is_secret_name(str(k)) and v not in (None, "", [], {})
                else redact(v, secrets=secrets)
            )
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact(v, secrets=secrets) for v in value)
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return _URL_USERINFO.sub(rf"\g<scheme>{REDACTED}@", value)
    return value

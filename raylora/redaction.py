"""What counts as a secret, and masking it: one rule for MLflow params, job submission output and logs.

A name containing token, key, secret, password or credential is a secret name (HF_TOKEN,
AWS_SECRET_ACCESS_KEY, model.token); the value of any environment variable with such a name is a secret
value, masked wherever it appears inside other text (a URL, a command line, an error message).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["REDACTED", "StreamRedactor", "is_secret_name", "redact", "secret_values"]

REDACTED = "***"
_SECRET_NAME = re.compile(r"token|key|secret|password|passwd|credential", re.IGNORECASE)
# Credentials inside a URL (https://user:password@host/...).
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@")


def is_secret_name(name: str) -> bool:
    """Whether a config field or environment variable name looks like it holds a secret."""
    return bool(_SECRET_NAME.search(name))


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables with secret names, longest first (so no secret is half-masked).

    Args:
        env: more variables to take secrets from, beside this process's environment (a job's own
            `env_vars`, given as `--env NAME=VALUE`).
    """
    variables = [*os.environ.items(), *(env or {}).items()]
    return sorted(
        {v for k, v in variables if is_secret_name(k) and isinstance(v, str) and len(v) >= 6},
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


class StreamRedactor:
    """Masks secrets in text that arrives in chunks (a log being followed), whatever the chunk boundaries.

    A chunk is masked on its own only up to where a secret could still be beginning: the last characters
    (one fewer than the longest secret) and the last unfinished word (so that a URL's `user:password@` is
    seen whole) wait for the next chunk, or for `flush` at the end of the stream.
    """

    _MAX_HELD = 65536  # a "word" longer than this is let through in pieces, still never splitting a secret

    def __init__(self, secrets: list[str] | None = None) -> None:
        self._secrets = secret_values() if secrets is None else secrets
        self._hold = max((len(s) for s in self._secrets), default=1) - 1
        self._pattern = re.compile("|".join(re.escape(s) for s in self._secrets)) if self._secrets else None
        self._pending = ""

    def feed(self, chunk: str) -> str:
        """The masked text that is safe to show after `chunk`; the rest is held back."""
        text = self._pending + chunk
        limit = max(len(text) - self._hold, 0)
        # The last word boundary before the limit: a word is shown whole, unless it grows past _MAX_HELD.
        cut = max(text.rfind(c, 0, limit) for c in " \t\r\n") + 1
        if len(text) - cut > self._MAX_HELD:
            cut = limit
        # Any secret that starts before the cut lies wholly in `text`: move the cut past one that spans it.
        for match in self._pattern.finditer(text) if self._pattern else ():
            if match.start() < cut < match.end():
                cut = match.end()
        shown, self._pending = text[:cut], text[cut:]
        return redact(shown, secrets=self._secrets) if shown else ""

    def flush(self) -> str:
        """The masked text still held back, at the end of the stream."""
        shown, self._pending = self._pending, ""
        return redact(shown, secrets=self._secrets) if shown else ""

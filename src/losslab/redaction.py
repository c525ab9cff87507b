"""Secrets stay out of MLflow, logs and printed text: one place that redacts them.

Two kinds of secret reach a config: credentials in URLs (``sweep.storage:
postgresql://user:password@host/db``, a tracking URI) and the de-identification salt (``data.salt``:
whoever knows it can re-identify every patient hash by hashing the public study ids).

* :func:`redact_text` replaces the password of every ``scheme://user:password@host`` URL (and a
  ``password=`` query parameter) in a text with ``***``;
* :func:`redact_config` returns a config dict with every string passed through :func:`redact_text`
  and ``data.salt`` replaced by :func:`redacted_salt` (``redacted-sha256:<8 hex>``, a fingerprint that
  tells two salts apart and cannot be turned back into the salt);
* :func:`salt_fingerprint` is that fingerprint.

:func:`losslab.tracking.log_config` (params and ``config.yaml``), the ``losslab.error`` tags, the sweep
summary and the command line's error messages go through these functions.
"""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Any

REDACTED = "***"
REDACTED_SALT_PREFIX = "redacted-sha256:"
_FINGERPRINT_PREFIX = "losslab-salt-fingerprint:"
# scheme://[user]:password@ — the password runs to the last "@" before whitespace or a quote
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"]*):(?P<password>[^\s'\"]+)@")
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&](?:password|passwd|pwd)=)[^&\s'\"]+", re.IGNORECASE)


def redact_text(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``.

    >>> redact_text("storage postgresql://losslab:s3cret@db:5432/optuna failed")
    'storage postgresql://losslab:***@db:5432/optuna failed'
    """
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}:{REDACTED}@", text)
    return _QUERY_PASSWORD.sub(lambda m: f"{m['head']}{REDACTED}", text)


def salt_fingerprint(salt: str) -> str:
    """The first 8 hex digits of ``sha256("losslab-salt-fingerprint:" + salt)``."""
    return hashlib.sha256(f"{_FINGERPRINT_PREFIX}{salt}".encode()).hexdigest()[:8]


def redacted_salt(salt: str | None) -> str | None:
    """What a logged config shows instead of a salt: ``redacted-sha256:<fingerprint>`` (None stays None)."""
    if not salt or str(salt).startswith(REDACTED_SALT_PREFIX):
        return salt
    return f"{REDACTED_SALT_PREFIX}{salt_fingerprint(str(salt))}"


def _redact_values(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_values(v) for v in value]
    return value


def redact_config(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict (``ExperimentConfig.to_dict()``) that is safe to log or print."""
    out = _redact_values(copy.deepcopy(data))
    if isinstance(out.get("data"), dict) and out["data"].get("salt"):
        out["data"]["salt"] = redacted_salt(out["data"]["salt"])
    return out

"""De-identification: salted hashes replace every patient or study identifier at preprocessing."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

SALT_ENV = "LOSSLAB_SALT"


def resolve_salt(configured: str | None, cache_dir: str | Path) -> str:
    """The salt: from config, else $LOSSLAB_SALT, else a random one kept in ``<cache>/.salt``.

    The per-cache file keeps hashes stable across re-runs of preprocess on one machine without
    putting the salt in the index, MLflow or logs.
    """
    if configured:
        return configured
    env = os.environ.get(SALT_ENV)
    if env:
        return env
    path = Path(cache_dir) / ".salt"
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    salt = secrets.token_hex(16)
    path.write_text(salt)
    os.chmod(path, 0o600)
    return salt


def salted_hash(identifier: str, salt: str, length: int = 16) -> str:
    """``sha256(salt + ':' + identifier)`` truncated to ``length`` hex characters."""
    digest = hashlib.sha256(f"{salt}:{identifier}".encode()).hexdigest()
    return digest[:length]

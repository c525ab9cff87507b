"""De-identification: salted hashes replace every patient or study identifier at preprocessing."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from losslab.redaction import REDACTED_SALT_PREFIX, salt_fingerprint

SALT_ENV = "LOSSLAB_SALT"


def resolve_salt(configured: str | None, cache_dir: str | Path) -> str:
    """The salt: from config, else $LOSSLAB_SALT, else a random one kept in ``<cache>/.salt``.

    A configured ``redacted-sha256:<fingerprint>`` (what a logged ``config.yaml`` holds) resolves to
    the salt of $LOSSLAB_SALT or ``<cache>/.salt`` with that fingerprint; there is none: ValueError.

    The per-cache file keeps hashes stable across re-runs of preprocess on one machine without
    putting the salt in the index, MLflow or logs.
    """
    if configured and configured.startswith(REDACTED_SALT_PREFIX):
        return _salt_matching(configured[len(REDACTED_SALT_PREFIX):], cache_dir)
    if configured:
        return configured
    env = os.environ.get(SALT_ENV)
    if env:
        return env
    path = Path(cache_dir) / ".salt"
    if not path.is_file():
        _create_salt_file(path)
    return path.read_text().strip()


def _create_salt_file(path: Path) -> None:
    """Write a random salt to ``path`` (mode 0600) unless a concurrent process got there first: the
    salt goes to a private temporary file that is then hard-linked into place, which fails when
    ``path`` exists, so every process reads the one salt, and never a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".salt.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(16))
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process wrote the salt first: use theirs
    finally:
        tmp.unlink(missing_ok=True)


def _salt_matching(fingerprint: str, cache_dir: str | Path) -> str:
    """A logged config's ``data.salt`` is a fingerprint (the salt is never logged): use the salt from
    $LOSSLAB_SALT or ``<cache>/.salt`` whose fingerprint matches, else say what to set."""
    path = Path(cache_dir) / ".salt"
    candidates = [os.environ.get(SALT_ENV), path.read_text().strip() if path.is_file() else None]
    for salt in candidates:
        if salt and salt_fingerprint(salt) == fingerprint:
            return salt
    raise ValueError(f"data.salt is {REDACTED_SALT_PREFIX}{fingerprint} (a logged config: the salt itself is never "
                     f"logged); set data.salt or ${SALT_ENV} to the original salt")


def salted_hash(identifier: str, salt: str, length: int = 16) -> str:
    """``sha256(salt + ':' + identifier)`` truncated to ``length`` hex characters."""
    digest = hashlib.sha256(f"{salt}:{identifier}".encode()).hexdigest()
    return digest[:length]

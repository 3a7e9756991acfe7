"""Instance secrets, encrypted at rest with Fernet (``cryptography``).

The key comes from ``settings.secrets_key`` (``SANDKEEP_SECRETS_KEY``) or, when unset, from a key file
generated once into the data dir (``$SANDKEEP_HOME/secrets.key``, mode 0600). Plaintext secrets exist only
in memory, on their way into a machine's environment; they are never returned by the service's public
views and never logged.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from sandkeep.config import Settings

KEY_FILE_NAME = "secrets.key"


class SecretsError(Exception):
    """A key is malformed or a token cannot be decrypted with it."""


def read_or_create_private(path: Path, generate: Callable[[], str]) -> tuple[str, bool]:
    """``(value, created)``: the file's content, or ``generate()`` saved there once with mode 0600.

    Safe when several processes start at once (serve, ``sandkeep token``, a second engine): the file is
    written aside and hard-linked into place, so the first writer wins and everyone reads the same value.
    """
    try:
        existing: str | None = path.read_text().strip()
    except FileNotFoundError:
        existing = None
    if existing:
        return existing, False
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = str(generate())
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    tmp = Path(tmp_name)
    try:
        os.write(fd, (fresh + "\n").encode())
    finally:
        os.close(fd)
    try:
        if existing is not None:  # the file was there but empty: nothing worth keeping
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if another process created the file meanwhile
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    value = path.read_text().strip()
    return value, value == fresh


def load_or_create_key(home: Path) -> bytes:
    """The Fernet key stored in ``home/secrets.key``, generated (0600) on first use."""
    value, _ = read_or_create_private(home / KEY_FILE_NAME, lambda: Fernet.generate_key().decode())
    return value.encode()


APP_NAME_SECRET_FILE = "app-name-secret"


def app_name_secret(settings: Settings) -> str:
    """The HMAC key of per-owner app names: ``SANDKEEP_APP_NAME_SECRET``, else ``$SANDKEEP_HOME/app-name-secret``
    (generated once, 0600), so app names (and Fly hostnames) cannot be derived from user ids."""
    if settings.app_name_secret:
        return settings.app_name_secret
    value, _ = read_or_create_private(settings.home / APP_NAME_SECRET_FILE, lambda: secrets.token_urlsafe(32))
    return value


class SecretBox:
    """Encrypts and decrypts secret values (strings) with one Fernet key."""

    def __init__(self, key: str | bytes) -> None:
        raw = key.encode() if isinstance(key, str) else key
        try:
            self._fernet = Fernet(raw.strip())
        except (ValueError, TypeError) as exc:
            raise SecretsError("secrets key must be a url-safe base64 Fernet key (32 bytes)") from exc

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        if settings.secrets_key:
            return cls(settings.secrets_key)
        return cls(load_or_create_key(settings.home))

    @staticmethod
    def generate_key() -> str:
        return Fernet.generate_key().decode()

    def encrypt(self, value: str) -> str:
        return self._fernet.encrypt(value.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except (InvalidToken, ValueError) as exc:
            raise SecretsError("cannot decrypt a stored secret: wrong SANDKEEP_SECRETS_KEY?") from exc

    def encrypt_map(self, values: Mapping[str, str]) -> dict[str, str]:
        return {name: self.encrypt(value) for name, value in values.items()}

    def decrypt_map(self, tokens: Mapping[str, str]) -> dict[str, str]:
        return {name: self.decrypt(token) for name, token in tokens.items()}

    def __repr__(self) -> str:  # never show the key
        return "SecretBox(<key hidden>)"

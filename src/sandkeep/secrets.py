"""Instance secrets, encrypted at rest with Fernet (``cryptography``).

The key comes from ``settings.secrets_key`` (``SANDKEEP_SECRETS_KEY``) or, when unset, from a key file
generated once into the data dir (``$SANDKEEP_HOME/secrets.key``, mode 0600). Plaintext secrets exist only
in memory, on their way into a machine's environment; they are never returned by the service's public
views and never logged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from sandkeep.config import Settings

KEY_FILE_NAME = "secrets.key"


class SecretsError(Exception):
    """A key is malformed or a token cannot be decrypted with it."""


def load_or_create_key(home: Path) -> bytes:
    """The Fernet key stored in ``home/secrets.key``, generated (0600) on first use."""
    path = home / KEY_FILE_NAME
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    home.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key()
    tmp = path.with_name(f".{KEY_FILE_NAME}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key + b"\n")
    finally:
        os.close(fd)
    try:
        # first writer wins: link fails if another process created the file meanwhile
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_bytes().strip()


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

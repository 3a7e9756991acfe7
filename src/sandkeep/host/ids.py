"""Identifiers shaped like Fly's."""

from __future__ import annotations

import secrets
import string
import time

_ALNUM = string.ascii_letters + string.digits
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def machine_id() -> str:
    """14 lowercase hex characters, e.g. ``3d8d9016b24d89``."""
    return secrets.token_hex(7)


def volume_id() -> str:
    return "vol_" + "".join(secrets.choice(_ALNUM) for _ in range(16))


def snapshot_id() -> str:
    return "vs_" + "".join(secrets.choice(_ALNUM) for _ in range(16))


def app_id() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(20))


def instance_id() -> str:
    """A ULID-like 26-character id (Fly's machine ``instance_id`` changes with every config version)."""
    ms = int(time.time() * 1000)
    head = ""
    for _ in range(10):
        head = _CROCKFORD[ms & 31] + head
        ms >>= 5
    return head + "".join(secrets.choice(_CROCKFORD) for _ in range(16))


def private_ip() -> str:
    parts = [secrets.token_hex(2) for _ in range(4)]
    return "fdaa:0:" + ":".join(parts) + ":0:1"

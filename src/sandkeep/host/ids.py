"""Identifiers shaped like Fly's, drawn from the host's randomness (a seeded ``random.Random`` makes them
reproducible in a simulation; the default is the operating system's randomness)."""

from __future__ import annotations

import random
import string

_ALNUM = string.ascii_letters + string.digits
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
SYSTEM_RANDOM: random.Random = random.SystemRandom()


def _pick(alphabet: str, n: int, rng: random.Random | None) -> str:
    r = rng or SYSTEM_RANDOM
    return "".join(r.choice(alphabet) for _ in range(n))


def machine_id(rng: random.Random | None = None) -> str:
    """14 lowercase hex characters, e.g. ``3d8d9016b24d89``."""
    return f"{(rng or SYSTEM_RANDOM).getrandbits(56):014x}"


def volume_id(rng: random.Random | None = None) -> str:
    return "vol_" + _pick(_ALNUM, 16, rng)


def snapshot_id(rng: random.Random | None = None) -> str:
    return "vs_" + _pick(_ALNUM, 16, rng)


def app_id(rng: random.Random | None = None) -> str:
    return _pick(string.ascii_lowercase + string.digits, 20, rng)


def instance_id(rng: random.Random | None = None, *, ms: int = 0) -> str:
    """A ULID-like 26-character id (Fly's machine ``instance_id`` changes with every config version); ``ms`` is
    the time in milliseconds on the host's clock."""
    head = ""
    for _ in range(10):
        head = _CROCKFORD[ms & 31] + head
        ms >>= 5
    return head + _pick(_CROCKFORD, 16, rng)


def private_ip(rng: random.Random | None = None) -> str:
    r = rng or SYSTEM_RANDOM
    parts = [f"{r.getrandbits(16):04x}" for _ in range(4)]
    return "fdaa:0:" + ":".join(parts) + ":0:1"

"""Instance names, labels and guest sizes: the one set of syntax rules (API, CLI and web UI all end here).

* **Name**: 1-63 characters, lowercase letters, digits and ``-``, starting and ending with a letter or digit
  (a DNS label), or none. Names are for people; they need not be unique.
* **Labels**: at most ``SANDKEEP_MAX_LABELS`` pairs; keys 1-63 characters of lowercase letters, digits and
  ``._-`` starting and ending with a letter or digit; values 0-63 characters of letters, digits and ``._-``.
* **Guest**: ``cpu_kind`` ``shared`` or ``performance``, ``cpus`` 1-16, ``memory_mb`` a multiple of 256
  from 256; what a non-admin may pick is :func:`sandkeep.engine.policy.check_guest`'s business.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sandkeep.engine.service import ServiceError

NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
LABEL_KEY_RE = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,61}[a-z0-9])?$")
LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9._-]{0,63}$")
CPU_KINDS = ("shared", "performance")
MAX_CPUS = 16
MEMORY_STEP_MB = 256
MAX_MEMORY_MB = 128 * 1024


class InvalidName(ServiceError):
    code = "invalid_name"
    http_status = 422


class InvalidLabels(ServiceError):
    code = "invalid_labels"
    http_status = 422


class InvalidGuest(ServiceError):
    code = "invalid_guest"
    http_status = 422


class GuestNotAllowed(ServiceError):
    """A guest outside SANDKEEP_GUEST_CPU_KINDS / SANDKEEP_GUEST_MAX_CPUS / SANDKEEP_GUEST_MAX_MEMORY_MB."""

    code = "guest_not_allowed"
    http_status = 422


@dataclass(frozen=True)
class GuestRequest:
    cpu_kind: str
    cpus: int
    memory_mb: int


def validate_name(name: object) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidName(f"invalid name {str(name)[:80]!r}: 1-63 lowercase letters, digits and '-', starting and "
                          "ending with a letter or digit")
    return name


def validate_labels(labels: object, max_labels: int) -> dict[str, str]:
    if not isinstance(labels, dict):
        raise InvalidLabels("labels must be an object of strings")
    if len(labels) > max_labels:
        raise InvalidLabels(f"at most {max_labels} labels (SANDKEEP_MAX_LABELS); got {len(labels)}",
                            max_labels=max_labels)
    out: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not LABEL_KEY_RE.match(key):
            raise InvalidLabels(f"invalid label key {str(key)[:80]!r}: 1-63 lowercase letters, digits and '._-', "
                                "starting and ending with a letter or digit")
        if not isinstance(value, str) or not LABEL_VALUE_RE.match(value):
            raise InvalidLabels(f"invalid value of label {key!r}: at most 63 letters, digits and '._-'")
        out[key] = value
    return out


def parse_labels(text: str) -> dict[str, str]:
    """``"team=ml, tier=gold"`` (commas or new lines) as a mapping; the syntax of each pair is checked later."""
    out: dict[str, str] = {}
    for part in re.split(r"[,\n]", text):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise InvalidLabels(f"label {part[:80]!r} must be key=value")
        out[key.strip()] = value.strip()
    return out


def validate_guest(cpu_kind: object, cpus: object, memory_mb: object) -> GuestRequest:
    if cpu_kind not in CPU_KINDS:
        raise InvalidGuest(f"cpu_kind must be one of {', '.join(CPU_KINDS)}")
    if not isinstance(cpus, int) or isinstance(cpus, bool) or not 1 <= cpus <= MAX_CPUS:
        raise InvalidGuest(f"cpus must be a whole number from 1 to {MAX_CPUS}")
    if (not isinstance(memory_mb, int) or isinstance(memory_mb, bool) or memory_mb < MEMORY_STEP_MB
            or memory_mb > MAX_MEMORY_MB or memory_mb % MEMORY_STEP_MB):
        raise InvalidGuest(f"memory_mb must be a multiple of {MEMORY_STEP_MB} from {MEMORY_STEP_MB} to "
                           f"{MAX_MEMORY_MB}")
    assert isinstance(cpu_kind, str)
    return GuestRequest(cpu_kind=cpu_kind, cpus=cpus, memory_mb=memory_mb)

"""JSON types of the request fields Fly's Machines API defines, so a wrong type is a 400 like on Fly.

Fly's server decodes request bodies into Go structs: a field of the wrong JSON type is a 400 even when the
field is one this local host does not act on (``config.schedule: 5``, ``lease_ttl: "x"``). ``FIELD_TYPES`` is
the relevant part of Fly's spec (``definitions`` in ``tests/data/fly-machines-api.swagger.json``), one entry
per request shape: ``"string" | "boolean" | "integer" | "object" | "array"``, or ``"object:<shape>"`` /
``"array:<shape>"`` for a nested shape that is checked too. ``fly.Duration`` fields (stop timeouts) are left
out: Fly accepts a string (``"10s"``), a number or an object there. ``null`` is accepted everywhere (Go
decodes it to the zero value). Fields Fly does not define are ignored, as Fly ignores them.
``tests/host/test_schema.py`` checks this table against the spec file.
"""

from __future__ import annotations

from typing import Any

FIELD_TYPES: dict[str, dict[str, str]] = {
    "CreateAppRequest": {"app_name": "string", "network": "string", "org_slug": "string"},
    "CreateMachineRequest": {
        "config": "object:fly.MachineConfig", "lease_ttl": "integer", "lsvd": "boolean", "name": "string",
        "region": "string", "skip_launch": "boolean", "skip_service_registration": "boolean"},
    "UpdateMachineRequest": {
        "config": "object:fly.MachineConfig", "current_version": "string", "lease_ttl": "integer", "lsvd": "boolean",
        "name": "string", "region": "string", "skip_launch": "boolean", "skip_service_registration": "boolean"},
    "CreateVolumeRequest": {
        "compute": "object:fly.MachineGuest", "encrypted": "boolean", "fstype": "string", "machines_only": "boolean",
        "name": "string", "region": "string", "require_unique_zone": "boolean", "size_gb": "integer",
        "snapshot_id": "string", "snapshot_retention": "integer", "source_volume_id": "string"},
    "ExtendVolumeRequest": {"size_gb": "integer"},
    "StopRequest": {"signal": "string"},
    "fly.MachineConfig": {
        "auto_destroy": "boolean", "checks": "object", "disable_machine_autostart": "boolean",
        "dns": "object:fly.DNSConfig", "env": "object", "files": "array", "guest": "object:fly.MachineGuest",
        "image": "string", "init": "object:fly.MachineInit", "metadata": "object",
        "metrics": "object:fly.MachineMetrics", "mounts": "array:fly.MachineMount", "processes": "array",
        "restart": "object:fly.MachineRestart", "schedule": "string", "services": "array", "size": "string",
        "standbys": "array", "statics": "array", "stop_config": "object:fly.StopConfig"},
    "fly.MachineGuest": {
        "cpu_kind": "string", "cpus": "integer", "gpu_kind": "string", "gpus": "integer",
        "host_dedication_id": "string", "kernel_args": "array", "memory_mb": "integer"},
    "fly.MachineMount": {
        "add_size_gb": "integer", "encrypted": "boolean", "extend_threshold_percent": "integer", "name": "string",
        "path": "string", "size_gb": "integer", "size_gb_limit": "integer", "volume": "string"},
    "fly.StopConfig": {"signal": "string"},
    "fly.MachineInit": {
        "cmd": "array", "entrypoint": "array", "exec": "array", "kernel_args": "array", "swap_size_mb": "integer",
        "tty": "boolean"},
    "fly.MachineRestart": {"max_retries": "integer", "policy": "string"},
    "fly.DNSConfig": {"nameservers": "array", "options": "array", "searches": "array", "skip_registration": "boolean"},
    "fly.MachineMetrics": {"path": "string", "port": "integer"},
}

_JSON_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}


def json_type(value: Any) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _matches(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    raise ValueError(f"unknown JSON type {kind!r}")


def type_errors(value: Any, shape: str, where: str = "") -> list[str]:
    """Messages for every field of ``value`` (an object of ``shape``) whose JSON type is wrong."""
    if not isinstance(value, dict):
        return [f"{where or 'body'} must be a JSON object, got {json_type(value)}"]
    errors: list[str] = []
    for name, spec in FIELD_TYPES[shape].items():
        if name not in value or value[name] is None:
            continue
        kind, _, nested = spec.partition(":")
        path = f"{where}.{name}" if where else name
        item = value[name]
        if not _matches(item, kind):
            article = "an" if kind[0] in "aeiou" else "a"
            errors.append(f"{path} must be {article} {kind}, got {json_type(item)}")
            continue
        if nested and kind == "object":
            errors += type_errors(item, nested, path)
        elif nested and kind == "array":
            for i, element in enumerate(item):
                errors += type_errors(element, nested, f"{path}[{i}]")
    return errors

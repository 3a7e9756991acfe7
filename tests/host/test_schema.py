"""The host's request type table is Fly's spec, and its checker reports wrong types field by field."""

from __future__ import annotations

from typing import Any

from sandkeep.host.schema import FIELD_TYPES, type_errors
from tests.host.specvalidate import spec


def _ref(prop: dict[str, Any]) -> str | None:
    if "$ref" in prop:
        return str(prop["$ref"]).rsplit("/", 1)[1]
    all_of = prop.get("allOf")
    if isinstance(all_of, list) and len(all_of) == 1 and "$ref" in all_of[0]:
        return str(all_of[0]["$ref"]).rsplit("/", 1)[1]
    return None


def derived_from_spec() -> dict[str, dict[str, str]]:
    definitions = spec()["definitions"]
    out: dict[str, dict[str, str]] = {}
    for shape in FIELD_TYPES:
        fields: dict[str, str] = {}
        for name, prop in definitions[shape].get("properties", {}).items():
            ref = _ref(prop)
            items_ref = _ref(prop.get("items", {})) if prop.get("type") == "array" else None
            if ref == "fly.Duration":
                continue  # Fly accepts "10s", a number or an object: not type-checked
            if ref is not None:
                fields[name] = f"object:{ref}" if ref in FIELD_TYPES else definitions[ref].get("type", "object")
            elif items_ref in FIELD_TYPES:
                fields[name] = f"array:{items_ref}"
            elif "type" in prop:
                fields[name] = prop["type"]
        out[shape] = fields
    return out


def test_field_types_match_flys_spec() -> None:
    assert FIELD_TYPES == derived_from_spec()


def test_type_errors_name_each_wrong_field() -> None:
    body = {"name": 5, "lease_ttl": 1.5, "skip_launch": None, "unknown": object(),
            "config": {"image": "x", "schedule": 1, "guest": {"cpus": True},
                       "mounts": [{"volume": "v"}, {"volume": 7}], "init": {"cmd": "ls"}}}
    assert type_errors(body, "CreateMachineRequest") == [
        "config.guest.cpus must be an integer, got boolean",
        "config.init.cmd must be an array, got string",
        "config.mounts[1].volume must be a string, got integer",
        "config.schedule must be a string, got integer",
        "lease_ttl must be an integer, got number",
        "name must be a string, got integer",
    ]
    assert type_errors({"config": {"image": "x", "stop_config": {"timeout": "10s"}}}, "UpdateMachineRequest") == []
    assert type_errors([], "StopRequest") == ["body must be a JSON object, got array"]
